"""The kernel's SFT loop.

Per optimizer step: ``grad_accum`` micro-batches; labels pass through ``metareason_sft_labels``;
loss = token-mean cross-entropy over completion tokens + weighted extra terms from
``metareason_extra_losses`` (each logged); clipping; AdamW (or 8-bit AdamW); warmup + cosine.
A NaN/inf loss stops the run before the optimizer step, so the last checkpoint stays the last
good one. Checkpoints carry everything needed for an exact resume.
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from metareason.checkpoint import (clean_partial, latest_checkpoint, load_training_state, load_weights_into,
                                   save_checkpoint)
from metareason.config import ConfigError, dump_config
from metareason.data.tokenize import IGNORE_INDEX, SFTStream, encode_examples
from metareason.errors import UserError
from metareason.metrics import MetricsLogger, progress, read_metrics, truncate_after
from metareason.train.optim import build_optimizer, build_scheduler


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(kernel, resume: bool) -> Path:
    run_dir = kernel.config.run_dir
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
        clean_partial(run_dir)
    elif run_dir.exists():
        for name in ("checkpoints", "metrics.jsonl", "tensorboard", "report.md", "plots", "eval_samples.jsonl"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(dump_config(kernel.config), encoding="utf-8")
    tmp.replace(run_dir / "config.yaml")
    return run_dir


def load_train_examples(kernel) -> list[dict]:
    specs = kernel.config.data.train
    if not specs:
        raise ConfigError(f"{kernel._source}: data.train: no training tasks configured")
    examples: list[dict] = []
    for i, spec in enumerate(specs):
        task = kernel.build_task(spec, field=f"data.train[{i}]")
        examples.extend(task[j] for j in range(len(task)))
    return examples


def autocast_context(mode: str, device: torch.device):
    if mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Labels are shifted left (not the logits), so the logits are used in place, without a copy.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    n = int((shifted != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(n, 1), n


def collect_extra_losses(kernel, model, batch, outputs, step) -> dict[str, tuple[float, torch.Tensor]]:
    terms: dict[str, tuple[float, torch.Tensor]] = {}
    for got in kernel.pm.hook.metareason_extra_losses(model=model, batch=batch, outputs=outputs,
                                                      config=kernel.config, step=step):
        for name, value in (got or {}).items():
            if name in terms:
                raise UserError(f"extra loss term {name!r} is returned by two plugins")
            weight, tensor = value if isinstance(value, tuple) else (1.0, value)
            terms[name] = (float(weight), tensor)
    return terms


def train_sft(kernel, resume: bool = False) -> dict:
    cfg = kernel.config
    tc = cfg.train
    run_dir = prepare_run_dir(kernel, resume)
    seed_everything(tc.seed)
    model, tokenizer = kernel.load()
    device = next(model.parameters()).device

    examples = load_train_examples(kernel)
    prompts = [kernel.chain("metareason_transform_prompt", "prompt", e["prompt"], example=e, config=cfg)
               for e in examples]
    encoded = encode_examples(tokenizer, prompts, [e["completion"] for e in examples], cfg.data.max_length)
    if encoded.truncated:
        print(f"[metareason] {encoded.truncated} of {len(examples)} training examples truncated to "
              f"data.max_length={cfg.data.max_length}", file=sys.stderr)
    try:
        stream = SFTStream(examples, encoded, tc.batch_size, tc.seed, tokenizer.pad_token_id, tc.group_by_length)
    except ValueError as exc:
        raise ConfigError(f"{kernel._source}: data.train: {exc}") from None
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)

    step = 0
    state: dict[str, Any] = {"tokens_seen": 0}
    last_ckpt: Optional[Path] = None
    if resume:
        last_ckpt = latest_checkpoint(run_dir)
        load_weights_into(model, last_ckpt)
        state = load_training_state(last_ckpt, optimizer, scheduler)
        step = int(state["step"])
        stream.position = int(state["data_position"])
        truncate_after(run_dir, step)
        print(f"[metareason] resumed from {last_ckpt} (step {step})", file=sys.stderr)

    logger = MetricsLogger(run_dir, append=resume)
    kernel.pm.hook.metareason_on_run_start(kernel=kernel, run_dir=str(run_dir))
    quiet = cfg.quiet or not sys.stderr.isatty()
    bar = progress(total=tc.max_steps, initial=step, desc="train", quiet=quiet)
    trainable = [p for p in model.parameters() if p.requires_grad]
    eval_metrics: dict = {}
    t_window, tok_window = time.perf_counter(), 0
    saved_at = -1
    try:
        while step < tc.max_steps:
            model.train()
            total_loss, lm_loss_sum, term_sums, n_tokens = 0.0, 0.0, {}, 0
            for _ in range(tc.grad_accum):
                batch = stream.next_batch()
                labels = kernel.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch,
                                      tokenizer=tokenizer, config=cfg)
                batch["labels"] = labels
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"]
                # Batches are right-padded and attention is causal, so no real token attends to
                # padding and pad positions are out of the loss: no attention mask is needed,
                # which keeps the fast causal attention path.
                with autocast_context(tc.autocast, device):
                    outputs = model(input_ids=ids, use_cache=False)
                lm_loss, n = token_loss(outputs.logits, labels.to(device))
                loss = lm_loss
                for name, (weight, term) in collect_extra_losses(kernel, model, batch, outputs, step).items():
                    loss = loss + weight * term
                    term_sums[name] = term_sums.get(name, 0.0) + float(term.detach()) / tc.grad_accum
                if not torch.isfinite(loss):
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"step {step + 1}: training loss is {float(loss.detach())}; the run stopped before the "
                        f"optimizer step ({where}). Lower train.lr or set train.max_grad_norm.")
                (loss / tc.grad_accum).backward()
                total_loss += float(loss.detach()) / tc.grad_accum
                lm_loss_sum += float(lm_loss.detach()) / tc.grad_accum
                n_tokens += int(mask.sum())
            grad_norm = None
            if tc.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens_seen"] = state.get("tokens_seen", 0) + n_tokens
            tok_window += n_tokens

            metrics = {"train/loss": total_loss, "train/lm_loss": lm_loss_sum,
                       "train/lr": scheduler.get_last_lr()[0], "train/epoch": stream.epoch}
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            for name, value in term_sums.items():
                metrics[f"train/{name}"] = value
            kernel.pm.hook.metareason_on_step_end(kernel=kernel, step=step, metrics=metrics)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.perf_counter() - t_window
                metrics["train/tokens_per_s"] = tok_window / max(elapsed, 1e-9)
                t_window, tok_window = time.perf_counter(), 0
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
                if quiet:  # no bar (quiet mode or not a terminal): a log line instead
                    print(f"[train] step {step}/{tc.max_steps} loss {total_loss:.4f} "
                          f"lr {metrics['train/lr']:.2e} tok/s {metrics['train/tokens_per_s']:.0f}",
                          file=sys.stderr, flush=True)
            if tc.save_every and step % tc.save_every == 0:
                last_ckpt = _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, state)
                saved_at = step
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps and cfg.data.eval:
                eval_metrics = _evaluate(kernel, model, tokenizer, step, logger, run_dir)
    finally:
        bar.close()
    if saved_at != step:
        last_ckpt = _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, state)
    if cfg.eval.at_end and cfg.data.eval:
        eval_metrics = _evaluate(kernel, model, tokenizer, step, logger, run_dir)
    logger.close()
    from metareason.report import write_report

    write_report(run_dir, cfg, read_metrics(run_dir))
    kernel.pm.hook.metareason_on_run_end(kernel=kernel, metrics=eval_metrics)
    kernel.last_model, kernel.last_tokenizer = model, tokenizer
    return eval_metrics


def _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, state) -> Path:
    trainer_state = dict(state, data_position=stream.position)
    path = save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, trainer_state,
                           kernel.config.train.keep_last)
    kernel.pm.hook.metareason_on_checkpoint(kernel=kernel, step=step, path=str(path))
    return path


def _evaluate(kernel, model, tokenizer, step, logger, run_dir) -> dict:
    from metareason.evaluate import evaluate

    metrics = evaluate(kernel, model, tokenizer, step=step, write_samples=Path(run_dir) / "eval_samples.jsonl")
    logger.log(step, metrics)
    acc = metrics.get("eval/accuracy", math.nan)
    print(f"[eval] step {step}: accuracy {acc:.4f}, mean generated tokens {metrics.get('eval/gen_tokens', 0):.1f}",
          file=sys.stderr, flush=True)
    return metrics
