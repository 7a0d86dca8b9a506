"""The plugin's part of ``report.md``: step statistics, error attribution, the attention heatmap
(``plots/memory_reason_attention.png``), left in ``report_sections/`` for the kernel's report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from metareason.api import write_text_atomic

SECTION = "memory_reason.md"
HEATMAP = "memory_reason_attention.png"


def section_markdown(step: int, stats: dict, heatmap: Optional[str]) -> str:
    lines = ["## Memory and reason steps", "",
             f"Step {step}; per generated answer: {stats['memory_steps']:.2f} memory steps, "
             f"{stats['reason_steps']:.2f} reason steps, {stats['steps']:.2f} steps in all."]
    if "type_accuracy" in stats:
        lines.append(f"Step types that match the gold step's type: {stats['type_accuracy']:.3f}.")
    lines += ["", f"Error attribution over {stats['attributed']} wrong answers with gold steps "
              "(the first step that differs from the gold step decides):", "",
              "| cause | share |", "|---|---|"]
    for cause in ("memory", "reason", "neither"):
        lines.append(f"| {cause} | {stats[f'error_{cause}']:.3f} |")
    if "error_entity" in stats:
        lines += ["", "Memory and reason errors split (wrong entity, wrong value, wrong operation, a missing step "
                  "or one of the other kind, a gold memory step that is not a fact sentence):", "",
                  "| cause | share |", "|---|---|"]
        for cause in ("entity", "value", "operation", "structure", "other"):
            lines.append(f"| {cause} | {stats[f'error_{cause}']:.3f} |")
    lines.append("")
    if heatmap:
        lines += [f"Attention of the answer tokens (mean over heads, answer tokens and completions): "
                  f"memory steps {stats['attn_memory']:.3f}, reason steps {stats['attn_reason']:.3f} "
                  "(mean over layers).", "", f"![answer attention]({heatmap})", ""]
    return "\n".join(lines)


def write_section(run_dir, step: int, stats: dict, shares) -> None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    heatmap = None
    if shares is not None:
        from metareason.plugins.memory_reason.attention import plot_heatmap

        (run_dir / "plots").mkdir(exist_ok=True)
        plot_heatmap(shares, run_dir / "plots" / HEATMAP, f"answer-token attention, step {step}")
        heatmap = f"plots/{HEATMAP}"
    folder = run_dir / "report_sections"
    folder.mkdir(exist_ok=True)
    write_text_atomic(folder / SECTION, section_markdown(step, stats, heatmap))
