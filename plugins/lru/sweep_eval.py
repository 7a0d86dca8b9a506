"""One trained sweep run evaluated on one split: ``python -m metareason.plugins.lru.sweep_eval``.

The sweep chooses learning rates on the ``validation`` split and reports the ``test`` split; both
go through this module, in a fresh interpreter per run. The eval set is the run config's first
``data.eval`` entry with its ``split``, ``seed`` and ``num_samples`` replaced, so validation and
test problems come from the same generator and levels, from disjoint problem sets (the causal-loop
task's ``val_fraction``).

It writes ``RUN_DIR/sweep-<split>.json``:

- ``accuracy``: per level and ``all`` (greedy generation, exact match; the kernel's ``evaluate``);
- ``loss``: teacher-forced mean cross-entropy of the reference completion tokens, per level;
- ``lru``: per level, over all real tokens and the LRU layers: mean iterations, ponder cost
  (n + R), first/last residual and the convergence ratio (mean last / mean first residual);
- ``iterations_by_example``: ``[level, mean iterations]`` per example, which the report turns into
  a rank correlation of iterations with level;
- ``num_parameters``, the checkpoint step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from metareason.api import write_json_atomic

SPLITS = ("validation", "test")
LRU_KEYS = ("iterations", "ponder", "first_residual", "last_residual")


def eval_entry(run_dir: Path, split: str, samples: int, seed: int) -> dict:
    """The run's first eval data entry, pointed at ``split``."""
    from metareason.api import UserError

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    entries = (cfg.get("data") or {}).get("eval") or []
    if not entries:
        raise UserError(f"{run_dir}: data.eval is empty; the sweep evaluates on its first entry")
    entry = json.loads(json.dumps(entries[0]))
    entry["params"] = dict(entry.get("params") or {}, split=split)
    entry.update(seed=seed, num_samples=samples)
    return entry


def teacher_forced(kernel, model, tokenizer, batch_size: int) -> dict:
    """Per example: level, completion-token loss sum and count, LRU per-token sums."""
    import torch
    import torch.nn.functional as F

    from metareason.api import IGNORE_INDEX, build_eval_examples, collate, encode_sft_examples
    from metareason.plugins.lru.stats import per_token

    examples = [ex for _, ex in build_eval_examples(kernel)]
    enc = encode_sft_examples(kernel, tokenizer, examples)
    device = next(model.parameters()).device
    rows = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids = enc.input_ids[start:start + batch_size]
            batch = collate(ids, enc.prompt_lengths[start:start + batch_size], tokenizer.pad_token_id)
            mask = batch["attention_mask"].to(device)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            logits = out.logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            nll = nll.masked_fill(labels == IGNORE_INDEX, 0.0)
            stats = getattr(out, "lru_stats", None)
            tok = per_token(stats, mask.bool()) if stats is not None and stats.layers else {}
            for i, ex in enumerate(examples[start:start + batch_size]):
                n = len(ids[i])
                row = {"group": ex["_group"], "loss_sum": float(nll[i].sum()),
                       "loss_tokens": int((labels[i] != IGNORE_INDEX).sum()), "tokens": n}
                for k in tok:
                    row[k] = float(tok[k][i, :n].sum())
                rows.append(row)
    return {"rows": rows, "has_lru": bool(rows and LRU_KEYS[0] in rows[0])}


def summarise(rows: list[dict], has_lru: bool) -> dict:
    """Per-level means of the teacher-forced pass (token-weighted, as ``metareason lru stats``)."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        for group in (r["group"], "all"):
            acc = sums[group]
            acc["loss_sum"] += r["loss_sum"]
            acc["loss_tokens"] += r["loss_tokens"]
            acc["tokens"] += r["tokens"]
            for k in LRU_KEYS if has_lru else ():
                acc[k] += r[k]
    loss = {g: a["loss_sum"] / max(a["loss_tokens"], 1) for g, a in sums.items()}
    lru = {}
    if has_lru:
        for g, a in sums.items():
            row = {k: a[k] / max(a["tokens"], 1) for k in LRU_KEYS}
            row["convergence_ratio"] = row["last_residual"] / row["first_residual"] if row["first_residual"] else math.nan
            row["tokens"] = int(a["tokens"])
            lru[g] = row
    return {"loss": dict(sorted(loss.items())), "lru": dict(sorted(lru.items()))}


def level_number(group: str) -> float:
    tail = group.rsplit("_", 1)[-1]
    return float(tail) if tail.isdigit() else math.nan


def evaluate_split(run_dir: str, split: str, samples: int, seed: int, batch_size: int = 64) -> Path:
    from metareason.api import UserError, cpu_name, evaluate, load_trained

    path = Path(run_dir)
    if split not in SPLITS:
        raise UserError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if not (path / "config.yaml").exists():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    entry = eval_entry(path, split, samples, seed)
    trained = load_trained(path, None, [f"data.eval={json.dumps([entry])}", "eval.max_samples=null", "quiet=true"])
    kernel, model, tokenizer = trained.kernel, trained.model, trained.tokenizer
    metrics = evaluate(kernel, model, tokenizer, step=trained.step, write_samples=path / f"eval_samples-{split}.jsonl")
    accuracy = {k[len("eval/accuracy/"):]: v for k, v in metrics.items() if k.startswith("eval/accuracy/")}
    accuracy["all"] = metrics["eval/accuracy"]
    tf = teacher_forced(kernel, model, tokenizer, batch_size)
    record = {"split": split, "samples": samples, "seed": seed, "step": trained.step, "eval_entry": entry,
              "num_parameters": sum(p.numel() for p in model.parameters()),
              "model_type": getattr(model.config, "model_type", None),
              "vocab_size": getattr(model.config, "vocab_size", None),
              "host": {"cpu": cpu_name(), "cpus": os.cpu_count()},  # the trial's machine (tokens/s compare within one)
              "accuracy": dict(sorted(accuracy.items())), **summarise(tf["rows"], tf["has_lru"]),
              "iterations_by_example": ([[level_number(r["group"]), r["iterations"] / max(r["tokens"], 1)]
                                         for r in tf["rows"]] if tf["has_lru"] else [])}
    target = path / f"sweep-{split}.json"
    write_json_atomic(target, record, indent=1)
    return target


def main(argv=None) -> int:
    from metareason.api import UserError

    p = argparse.ArgumentParser(prog="python -m metareason.plugins.lru.sweep_eval")
    p.add_argument("run_dir")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    try:
        print(evaluate_split(args.run_dir, args.split, args.samples, args.seed, args.batch_size))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
