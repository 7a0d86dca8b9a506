"""``runs/<name>/report.md`` with PNG plots: loss curve, accuracy per group, tokens per group."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from metareason.durable import write_text_atomic
from metareason.version import __version__


def _last_eval(rows: list[dict]) -> dict:
    evals = [r for r in rows if "eval/accuracy" in r]
    return evals[-1] if evals else {}


def _plot_loss(rows: list[dict], path: Path) -> bool:
    pts = [(r["step"], r["train/loss"]) for r in rows if isinstance(r.get("train/loss"), (int, float))]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if all(p[1] > 0 for p in pts):  # RL policy losses can be zero or negative
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_groups(last: dict, prefix: str, ylabel: str, path: Path) -> bool:
    groups = sorted(k[len(prefix):] for k in last if k.startswith(prefix))
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [last[prefix + g] for g in groups]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(groups, values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f" if prefix.startswith("eval/accuracy") else "%.1f")
    ax.set_ylabel(ylabel)
    if prefix.startswith("eval/accuracy"):
        ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SECTIONS_DIR = "report_sections"


def plugin_sections(run_dir: Path) -> list[str]:
    """Markdown that plugins left in ``run_dir/report_sections/*.md`` (name order), appended to the
    report; images they reference are paths relative to the run directory."""
    folder = Path(run_dir) / SECTIONS_DIR
    if not folder.is_dir():
        return []
    lines: list[str] = []
    for part in sorted(folder.glob("*.md")):
        lines += [part.read_text(encoding="utf-8").rstrip("\n"), ""]
    return lines


# the kernel's own eval metrics (the table above); any other eval/ key comes from a plugin
KERNEL_EVAL_METRICS = ("eval/accuracy", "eval/gen_tokens", "eval/num_samples")


def write_report(run_dir: Path, config: Any, rows: list[dict]) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    last = _last_eval(rows)
    train_rows = [r for r in rows if "train/loss" in r]
    lines = [f"# Run report: {config.name}", "",
             f"metareason {__version__}; config: `config.yaml` in this directory.", ""]
    model = config.model
    lines += ["## Setup", "",
              f"- model: {model.path or ('from config: ' + str((model.arch or {}).get('model_type')))}"
              f"; tokenizer: {model.tokenizer.type}; dtype: {model.dtype}",
              f"- training: {config.train.algorithm}, {config.train.max_steps} steps × batch "
              f"{config.train.batch_size} × accumulation {config.train.grad_accum}, lr {config.train.lr:g}",
              "- train data: " + ", ".join(f"{s.task} ({s.num_samples} samples, {s.params})" for s in config.data.train),
              "- eval data: " + ", ".join(f"{s.task} ({s.num_samples} samples, seed {s.seed}, {s.params})"
                                          for s in config.data.eval), ""]
    if train_rows:
        tps = [r["train/tokens_per_s"] for r in train_rows if "train/tokens_per_s" in r]
        lines += ["## Training", "",
                  f"- final train loss: {train_rows[-1]['train/loss']:.4f} (step {train_rows[-1]['step']})"]
        if tps:
            lines.append(f"- throughput: {sum(tps) / len(tps):.0f} tokens/s (mean of logged windows)")
        extra = sorted(k for k in train_rows[-1] if k.startswith("train/") and k not in (
            "train/loss", "train/lm_loss", "train/lr", "train/epoch", "train/grad_norm", "train/tokens_per_s"))
        for k in extra:
            lines.append(f"- final {k}: {train_rows[-1][k]:.4g}")
        lines.append("")
        if _plot_loss(rows, plots / "loss.png"):
            lines += ["![loss](plots/loss.png)", ""]
    if last:
        lines += ["## Evaluation", "", f"Step {last['step']}, {last.get('eval/num_samples', '?')} held-out examples, "
                  f"greedy decoding, exact match of the final answer.", "",
                  "| group | accuracy | mean generated tokens |", "|---|---|---|"]
        groups = sorted(k[len("eval/accuracy/"):] for k in last if k.startswith("eval/accuracy/"))
        for g in groups:
            lines.append(f"| {g} | {last[f'eval/accuracy/{g}']:.4f} | {last.get(f'eval/gen_tokens/{g}', float('nan')):.1f} |")
        lines.append(f"| **all** | **{last['eval/accuracy']:.4f}** | {last.get('eval/gen_tokens', float('nan')):.1f} |")
        lines.append("")
        if _plot_groups(last, "eval/accuracy/", "accuracy", plots / "accuracy.png"):
            lines += ["![accuracy per group](plots/accuracy.png)", ""]
        if _plot_groups(last, "eval/gen_tokens/", "mean generated tokens", plots / "tokens.png"):
            lines += ["![tokens per group](plots/tokens.png)", ""]
        more = sorted(k for k in last if k.startswith("eval/") and not k.startswith(KERNEL_EVAL_METRICS))
        if more:
            lines += ["Other evaluation metrics (from plugins):", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {last[k]:.4g} |" for k in more if isinstance(last[k], (int, float))] + [""]
    lines += plugin_sections(run_dir)
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
