"""What every training loop (SFT, GRPO) does around its optimizer steps.

Run directory, seeding, resume, metrics logging with a progress bar, the step / checkpoint /
eval events, the NaN stop, the final checkpoint + evaluation + report. A loop owns only its step.
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from metareason import durable
from metareason.checkpoint import (clean_partial, holds_checkpoints, latest_checkpoint, load_training_state,
                                   load_weights_into)
from metareason.config import ConfigError, dump_config
from metareason.errors import UserError
from metareason.metrics import MetricsLogger, progress, read_metrics, truncate_after


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(kernel, resume: bool, overwrite: bool = False) -> Path:
    """The run directory, ready for this run: ``resume`` finishes what a crash during a save left
    and needs a checkpoint; a fresh run refuses a directory that holds checkpoints unless
    ``overwrite`` (then the earlier run's outputs are deleted). Writes ``config.yaml`` and the
    plugin record (``plugins.json``) durably."""
    from metareason.run_plugins import write_record

    run_dir = kernel.config.run_dir
    if resume:  # first finish what a crash during a save left (it may put the only copy back)
        clean_partial(run_dir)
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
    elif run_dir.exists():
        if holds_checkpoints(run_dir) and not overwrite:
            raise UserError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to continue it, or "
                            f"--overwrite to delete them and start again")
        for name in ("checkpoints", "metrics.jsonl", "tensorboard", "report.md", "plots", "eval_samples.jsonl",
                     "report_sections"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    durable.write_text_atomic(run_dir / "config.yaml", dump_config(kernel.config))
    write_record(run_dir, kernel)
    return run_dir


def load_train_examples(kernel) -> list[dict]:
    specs = kernel.config.data.train
    if not specs:
        raise ConfigError(f"{kernel.source}: data.train: no training tasks configured")
    examples: list[dict] = []
    kernel.train_tasks = []
    for i, spec in enumerate(specs):
        task = kernel.build_task(spec, field=f"data.train[{i}]")
        kernel.train_tasks.append(task)
        for j in range(len(task)):
            ex = kernel.chain("metareason_transform_example", "example", dict(task[j]), config=kernel.config,
                              split="train")
            ex["_task"] = i  # which data.train task it came from (the task_score reward scores with it)
            examples.append(ex)
    return examples


def check_finite(loss: torch.Tensor, step: int, last_ckpt: Optional[Path]) -> None:
    """Stop before the optimizer step on a NaN/inf loss, naming the last good checkpoint."""
    if not torch.isfinite(loss):
        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"step {step + 1}: training loss is {float(loss.detach())}; the run stopped before the "
            f"optimizer step ({where}). Lower train.lr or set train.max_grad_norm.")


def evaluate_and_log(kernel, model, tokenizer, step, logger, run_dir) -> dict:
    from metareason.evaluate import evaluate

    metrics = evaluate(kernel, model, tokenizer, step=step, write_samples=Path(run_dir) / "eval_samples.jsonl")
    logger.log(step, metrics)
    acc = metrics.get("eval/accuracy", math.nan)
    print(f"[eval] step {step}: accuracy {acc:.4f}, mean generated tokens {metrics.get('eval/gen_tokens', 0):.1f}",
          file=sys.stderr, flush=True)
    return metrics


class RunDriver:
    """The bookkeeping of one training run around its steps.

    ``resume()`` restores weights, optimizer, scheduler and trainer state from the latest
    checkpoint; ``step_done()`` fires ``on_step_end``, advances the bar and logs every
    ``train.log_every`` steps (with tokens/s over the window); ``after_step()`` saves and evaluates
    on schedule; ``finish()`` writes the final checkpoint, evaluates and writes the report.
    ``save(step) -> Path`` is the loop's own checkpoint writer (what goes into trainer state).
    """

    def __init__(self, kernel, run_dir: Path, model, tokenizer, desc: str,
                 save: Callable[[int], Path]):
        self.kernel, self.run_dir, self.model, self.tokenizer = kernel, run_dir, model, tokenizer
        self.desc, self._save = desc, save
        self.step = 0
        self.state: dict[str, Any] = {"tokens_seen": 0}
        self.last_ckpt: Optional[Path] = None
        self.eval_metrics: dict = {}
        self._saved_at = -1
        self.logger: Optional[MetricsLogger] = None
        self.bar = None

    def resume(self, optimizer, scheduler) -> dict:
        self.last_ckpt = latest_checkpoint(self.run_dir)
        load_weights_into(self.model, self.last_ckpt)
        self.state = load_training_state(self.last_ckpt, optimizer, scheduler)
        self.step = int(self.state["step"])
        truncate_after(self.run_dir, self.step)
        print(f"[metareason] resumed from {self.last_ckpt} (step {self.step})", file=sys.stderr)
        return self.state

    def start(self, resume: bool) -> None:
        cfg = self.kernel.config
        self.logger = MetricsLogger(self.run_dir, append=resume)
        self.kernel.pm.hook.metareason_on_run_start(kernel=self.kernel, run_dir=str(self.run_dir))
        self.quiet = cfg.quiet or not sys.stderr.isatty()
        self.bar = progress(total=cfg.train.max_steps, initial=self.step, desc=self.desc, quiet=self.quiet)
        self._t_window, self._tok_window = time.perf_counter(), 0

    def step_done(self, n_tokens: int, metrics: dict,
                  describe: Callable[[dict], tuple[dict, str]]) -> None:
        """Count step ``self.step + 1`` as done. ``describe(metrics)`` gives the bar's postfix and
        the text of the log line printed instead of the bar when quiet or not on a terminal."""
        tc = self.kernel.config.train
        self.step += 1
        self.state["tokens_seen"] = self.state.get("tokens_seen", 0) + n_tokens
        self._tok_window += n_tokens
        self.kernel.pm.hook.metareason_on_step_end(kernel=self.kernel, step=self.step, metrics=metrics)
        self.bar.update(1)
        if self.step % tc.log_every == 0 or self.step == tc.max_steps:
            elapsed = time.perf_counter() - self._t_window
            metrics["train/tokens_per_s"] = self._tok_window / max(elapsed, 1e-9)
            self._t_window, self._tok_window = time.perf_counter(), 0
            self.logger.log(self.step, metrics)
            postfix, text = describe(metrics)
            self.bar.set_postfix(**postfix)
            if self.quiet:
                print(f"[{self.desc}] step {self.step}/{tc.max_steps} {text}", file=sys.stderr, flush=True)

    def after_step(self) -> None:
        cfg, step = self.kernel.config, self.step
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            self.last_ckpt = self._save(step)
            self._saved_at = step
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps and cfg.data.eval:
            self.eval_metrics = evaluate_and_log(self.kernel, self.model, self.tokenizer, step, self.logger,
                                                 self.run_dir)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> dict:
        cfg, step = self.kernel.config, self.step
        if self._saved_at != step:
            self.last_ckpt = self._save(step)
        if cfg.eval.at_end and cfg.data.eval:
            self.eval_metrics = evaluate_and_log(self.kernel, self.model, self.tokenizer, step, self.logger,
                                                 self.run_dir)
        self.logger.close()
        from metareason.report import write_report

        write_report(self.run_dir, cfg, read_metrics(self.run_dir))
        self.kernel.pm.hook.metareason_on_run_end(kernel=self.kernel, metrics=self.eval_metrics)
        self.kernel.last_model, self.kernel.last_tokenizer = self.model, self.tokenizer
        return self.eval_metrics
