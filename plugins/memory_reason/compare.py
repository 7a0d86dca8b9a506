"""The comparison on the synthetic world (``metareason memory_reason compare``).

Stage ``base``: a tiny Llama learns the world's facts from scratch (world_base.yaml) and is
exported as a Hugging Face directory (the stand-in for a pretrained model). Stage ``variants``:
from that base, with the same data, steps and learning rate, three fine-tunes on two-hop
questions: plain CoT SFT, memory/reason tokens with full fine-tuning, and memory/reason tokens
with lora+prompt-tuning. Stage ``report``: held-out accuracy, error attribution shares, tokens
per answer, steps per answer, trainable parameters -> ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from metareason.api import UserError, write_json_atomic

BASE = "world_base.yaml"
VARIANTS = (("plain CoT SFT", "world_plain.yaml"), ("tokens, full", "world_tokens_full.yaml"),
            ("tokens, lora+prompt-tuning", "world_tokens_lora_pt.yaml"))
KEYS = ("eval/accuracy", "eval/gen_tokens", "eval/memory_reason/memory_steps", "eval/memory_reason/reason_steps",
        "eval/memory_reason/steps", "eval/memory_reason/type_accuracy", "eval/memory_reason/wrong",
        "eval/memory_reason/error_memory", "eval/memory_reason/error_reason", "eval/memory_reason/error_neither",
        "eval/memory_reason/attn_memory", "eval/memory_reason/attn_reason")


def _config(config_dir: Path, name: str) -> Path:
    path = config_dir / name
    if not path.is_file():
        raise UserError(f"config_dir: {config_dir}: missing {name}")
    return path


def _base(config_dir: Path, output_dir: str, quiet: bool) -> Path:
    from metareason.api import Kernel, export_run

    kernel = Kernel(_config(config_dir, BASE), overrides=[f"output_dir={output_dir}", f"quiet={str(quiet).lower()}"])
    t0 = time.perf_counter()
    metrics = kernel.run(overwrite=True)  # the comparison's own run directories
    run_dir = kernel.config.run_dir
    hf = run_dir / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    export_run(run_dir, hf)
    info = {"accuracy": metrics.get("eval/accuracy"), "wall_s": time.perf_counter() - t0, "export": str(hf)}
    (run_dir / "base_info.json").write_text(json.dumps(info, indent=2))
    print(f"[memory_reason] base: fact recall {info['accuracy']:.3f}, exported to {hf}", file=sys.stderr)
    return hf


def _variant(config_dir: Path, file: str, base: Path, output_dir: str, overrides: list, quiet: bool,
             seed: int) -> dict:
    from metareason.api import Kernel, read_yaml
    from metareason.plugins.memory_reason.modes import trainable_parameters

    path = _config(config_dir, file)
    name = f"{read_yaml(path).get('name', 'run')}-s{seed}"
    ovr = [f"model.path={base}", f"output_dir={output_dir}", f"quiet={str(quiet).lower()}", f"name={name}",
           f"train.seed={seed}"] + overrides
    kernel = Kernel(path, overrides=ovr)
    t0 = time.perf_counter()
    metrics = kernel.run(overwrite=True)  # the comparison's own run directories
    row = {k: metrics.get(k) for k in KEYS}
    row.update(config=file, seed=seed, run_dir=str(kernel.config.run_dir), wall_s=time.perf_counter() - t0,
               trainable_params=trainable_parameters(kernel.last_model),
               total_params=sum(p.numel() for p in kernel.last_model.parameters()))
    return row


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v, digits=3):
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(record: dict) -> str:
    lines = ["# memory_reason: plain CoT vs memory/reason step tokens on the synthetic world", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {record['cpu']}, torch {record['torch']}, OMP_NUM_THREADS={record['omp_threads']}.", "",
             "Setup: a tiny Llama (char tokenizer) first learns the world's facts from scratch (one-hop recall; "
             f"base fact-recall accuracy {_fmt(record['base'].get('accuracy'))}); each variant fine-tunes that base "
             "with the same data (two-hop questions: recall two facts, add or subtract), steps, batch and learning "
             "rate, and is evaluated greedily on held-out questions over the same facts.", "",
             f"Seeds (training data order and init of LoRA): {record['seeds']}; every number is the mean over "
             "seeds, the accuracy of each seed in brackets.", "",
             "| variant | held-out accuracy | tokens / answer | memory steps | reason steps | type acc. | wrong | "
             "err. memory | err. reason | err. neither | attn memory | attn reason | trainable params | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in record["variants"].items():
        r = {k: _mean(runs, k) for k in KEYS + ("wall_s",)}
        per_seed = ", ".join(f"{x['eval/accuracy']:.3f}" for x in runs)
        lines.append(
            f"| {name} | {_fmt(r['eval/accuracy'])} ({per_seed}) | {_fmt(r['eval/gen_tokens'], 1)} | "
            f"{_fmt(r['eval/memory_reason/memory_steps'], 2)} | {_fmt(r['eval/memory_reason/reason_steps'], 2)} | "
            f"{_fmt(r['eval/memory_reason/type_accuracy'])} | {_fmt(r['eval/memory_reason/wrong'], 1)} | "
            f"{_fmt(r['eval/memory_reason/error_memory'])} | {_fmt(r['eval/memory_reason/error_reason'])} | "
            f"{_fmt(r['eval/memory_reason/error_neither'])} | {_fmt(r['eval/memory_reason/attn_memory'])} | "
            f"{_fmt(r['eval/memory_reason/attn_reason'])} | {runs[0]['trainable_params']:,} of "
            f"{runs[0]['total_params']:,} | {r['wall_s']:.0f} |")
    lines += ["", "Error attribution: for each wrong answer, the first generated step that differs from the gold "
              "step at the same position decides (its gold type: memory = a wrong or missing recalled fact, "
              "reason = wrong arithmetic on the recalled values); `neither` = all steps right, answer line wrong. "
              "Shares are over the wrong answers. Tokens per answer count every generated token, the step-type "
              "and prefix tokens included. Plain CoT has no type tokens, so its memory/reason step counts are 0.",
              "", "Attention: mean attention mass of the answer-line tokens on the memory-step and reason-step "
              "tokens (mean over heads, layers and 16 completions; a mass, so longer steps draw more); the per-layer "
              "heatmaps are in each run's `plots/memory_reason_attention.png`. Interpretation: docs/memory_reason.md.",
              ""]
    return "\n".join(lines)


def run_compare(config_dir: str, out: str = "bench-results/memory_reason-world", overrides=(), quiet: bool = False,
                output_dir: str = "runs", stages: str = "base,variants,report", seeds=(0,)) -> dict:
    import os

    import torch

    from metareason.api import cpu_name, write_record

    wanted = {s.strip() for s in stages.split(",") if s.strip()}
    bad = wanted - {"base", "variants", "report"}
    if bad:
        raise UserError(f"--stages: unknown stage {sorted(bad)[0]!r} (base, variants, report)")
    config_dir = Path(config_dir)
    base_dir = Path(output_dir) / "memory_reason_base"
    results = Path(output_dir) / "memory_reason_compare.json"
    if "base" in wanted:
        _base(config_dir, output_dir, quiet)
    if not (base_dir / "hf" / "config.json").exists():
        raise UserError(f"{base_dir / 'hf'}: no exported base (run the base stage first)")
    done = json.loads(results.read_text()) if results.exists() else {}  # "<variant>|<seed>" -> row
    if "variants" in wanted:
        for seed in seeds:
            for name, file in VARIANTS:
                done[f"{name}|{seed}"] = _variant(config_dir, file, (base_dir / "hf").resolve(), output_dir,
                                                  list(overrides), quiet, seed)
                write_json_atomic(results, done)
    rows = {name: [done[f"{name}|{s}"] for s in seeds if f"{name}|{s}" in done] for name, _ in VARIANTS}
    rows = {k: v for k, v in rows.items() if v}
    record = {"command": "metareason memory_reason compare " + " ".join(sys.argv[3:]).strip(),
              "cpu": cpu_name(), "torch": torch.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
              "seeds": list(seeds),
              "base": json.loads((base_dir / "base_info.json").read_text()) if (base_dir / "base_info.json").exists() else {},
              "variants": rows}
    if "report" in wanted and rows:
        write_record(Path(out).with_suffix(".json"), record, markdown(record))
    return record
