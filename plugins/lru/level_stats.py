"""Per-level LRU statistics: a teacher-forced pass over a run's eval examples.

For every eval group (``level_1`` ... ``level_4`` for causal-loop tasks) and over all real tokens
(prompt and solution): mean iterations, mean ponder cost, mean residual of the first and of the
last iteration each token ran, and the convergence ratio = mean last / mean first residual.
Values are averaged over the layers that have an LRU. ``metareason lru stats RUN_DIR`` writes
them to ``RUN_DIR/lru_stats.json`` with the model's parameter count (also for models without an
LRU, whose ``levels`` is then empty); the sweep reads that file.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from metareason.api import write_json_atomic
from metareason.plugins.lru.stats import per_token

KEYS = ("iterations", "ponder", "first_residual", "last_residual")


@torch.no_grad()
def level_stats(kernel, model, tokenizer, batch_size: int = 64) -> dict:
    """``{group: {iterations, ponder, first_residual, last_residual, convergence_ratio, tokens}}``;
    ``{}`` for a model without LRU statistics."""
    from metareason.api import build_eval_examples, collate, encode_sft_examples, progress

    pairs = build_eval_examples(kernel)
    examples = [ex for _, ex in pairs]
    enc = encode_sft_examples(kernel, tokenizer, examples)
    device = next(model.parameters()).device
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    was_training = model.training
    model.eval()
    bar = progress(total=len(examples), desc="lru stats", quiet=kernel.config.quiet)
    try:
        for start in range(0, len(examples), batch_size):
            rows = enc.input_ids[start:start + batch_size]
            batch = collate(rows, enc.prompt_lengths[start:start + batch_size], tokenizer.pad_token_id)
            out = model(input_ids=batch["input_ids"].to(device), use_cache=False)
            stats = getattr(out, "lru_stats", None)
            if stats is None or not stats.layers:
                return {}
            tok = per_token(stats, batch["attention_mask"].bool())
            for i, ex in enumerate(examples[start:start + batch_size]):
                n = len(rows[i])
                for group in (ex["_group"], "all"):
                    acc = sums[group]
                    for k in KEYS:
                        acc[k] += float(tok[k][i, :n].sum())
                    acc["tokens"] += n
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    result = {}
    for group, acc in sums.items():
        n = max(acc["tokens"], 1)
        row = {k: acc[k] / n for k in KEYS}
        row["convergence_ratio"] = row["last_residual"] / row["first_residual"] if row["first_residual"] else float("nan")
        row["tokens"] = int(acc["tokens"])
        result[group] = row
    return dict(sorted(result.items()))


def run_dir_stats(run_dir: str, checkpoint: Optional[str] = None, quiet: bool = True) -> Path:
    """Load a run's config and checkpoint, compute :func:`level_stats`, write ``lru_stats.json``."""
    from metareason.api import Kernel, UserError, latest_checkpoint, load_weights_into

    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    kernel = Kernel(path / "config.yaml", overrides=["quiet=true"] if quiet else [])
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(path)
    if ckpt is None or not ckpt.is_dir():
        raise UserError(f"{run_dir}: no checkpoint (train first, or pass --checkpoint)")
    model, tokenizer = kernel.load()
    load_weights_into(model, ckpt)
    section = getattr(kernel.config, "lru", None)
    stats = level_stats(kernel, model, tokenizer, section.stats_batch_size if section is not None else 64)
    record = {"checkpoint": ckpt.name, "model_type": getattr(model.config, "model_type", None),
              "num_parameters": sum(p.numel() for p in model.parameters()), "levels": stats}
    target = path / "lru_stats.json"
    write_json_atomic(target, record)
    return target
