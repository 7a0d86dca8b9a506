"""``metareason eval``: evaluate a run directory (its config and a checkpoint) or a config file.

Above the kernel (it builds one), so :mod:`metareason.evaluate`, which the kernel calls, never
imports the kernel back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from metareason.errors import UserError
from metareason.evaluate import evaluate
from metareason.kernel import Kernel
from metareason.metrics import MetricsLogger, read_metrics
from metareason.report import write_report
from metareason.trained import load_trained


def evaluate_target(target: str, overrides: list[str], checkpoint: Optional[str] = None,
                    quiet: bool = False, samples: Optional[str] = None):
    """``metareason eval``: a run directory (its config + latest checkpoint) or a config file.
    ``samples``: where the per-question results go (a run directory: default its
    ``eval_samples.jsonl``; a config: only there when given)."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{target}: no such run directory or config file")
    overrides = overrides + (["quiet=true"] if quiet else [])
    if path.is_dir():
        trained = load_trained(path, checkpoint, overrides)
        metrics = evaluate(trained.kernel, trained.model, trained.tokenizer, step=trained.step,
                           write_samples=Path(samples) if samples else path / "eval_samples.jsonl")
        logger = MetricsLogger(path, append=True, tensorboard=False)
        logger.log(trained.step, metrics)
        logger.close()
        write_report(path, trained.kernel.config, read_metrics(path))
        return metrics, path
    from metareason.train.loop import seed_everything

    kernel = Kernel(path, overrides=overrides)
    seed_everything(kernel.config.train.seed)  # as for a run directory: sampled evaluations repeat
    model, tokenizer = kernel.load()
    return evaluate(kernel, model, tokenizer, write_samples=Path(samples) if samples else None), None
