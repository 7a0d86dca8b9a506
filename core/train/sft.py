"""The kernel's SFT loop.

Per optimizer step: ``grad_accum`` micro-batches; labels pass through ``metareason_sft_labels``;
then, with ``train.packing`` on, the micro-batch is packed padding-free where that removes
enough padding (:mod:`metareason.data.packing`; same loss and gradients as the padded batch);
loss = token-mean cross-entropy over completion tokens + weighted extra terms from
``metareason_extra_losses`` (each logged); clipping; AdamW (or 8-bit AdamW); warmup + cosine.
A NaN/inf loss stops the run before the optimizer step, so the last checkpoint stays the last
good one. Checkpoints carry everything needed for an exact resume.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from metareason.checkpoint import save_checkpoint
from metareason.config import ConfigError
from metareason.data.packing import UnpackedOutputs, pack_batch, packing_support, plan
from metareason.data.tokenize import IGNORE_INDEX, SFTStream, encode_examples
from metareason.errors import UserError
from metareason.train.fused_ce import STATE_KEY as FUSED_OFF
from metareason.train.fused_ce import shifted_labels
from metareason.train.fused_ce import fused_ce_mode, fused_token_loss, hidden_forward
from metareason.train.lean_act import lean_activations_mode, unpatch
from metareason.train.loop import (RunDriver, check_finite, load_train_examples, prepare_run_dir,
                                   seed_everything)
from metareason.train.optim import build_optimizer, build_scheduler


def autocast_context(mode: str, device: torch.device):
    if mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Labels are shifted left (not the logits), so the logits are used in place, without a copy.
    """
    shifted, n = shifted_labels(labels)
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


def packing_mode(setting, model) -> tuple[bool, str]:
    """``train.packing`` resolved for this model: (on, a line saying why)."""
    supported, why = packing_support(model)
    if setting is True and not supported:
        raise ConfigError(f"train.packing: true, but this model cannot keep packed examples apart ({why}); "
                          "set train.packing: auto or false")
    on = supported if setting == "auto" else bool(setting)
    return on, f"train.packing={str(setting).lower()}: {'on' if on else 'off'} ({why})"


def forward_batch(model, batch: dict, labels: torch.Tensor, device, pad_id: int, packing: bool,
                  autocast: str = "none", fused: bool = False) -> tuple:
    """The model's forward on one SFT micro-batch and its token loss.

    With ``packing`` the batch is packed (:mod:`metareason.data.packing`) when that removes
    enough padding (:func:`~metareason.data.packing.plan`), else it runs padded.
    Returns ``(outputs, loss, n, packed)``: ``outputs.logits`` is in the padded ``[B, W, V]``
    layout either way (unpacked lazily for hooks that read it: mcft's format term), ``loss``
    the token-mean cross-entropy over ``n`` label tokens (the same pairs and the same ``n``
    packed or padded), ``packed`` whether it ran packed. With ``fused`` (``train.fused_ce``) the
    loss comes from the final hidden states through the fused op (:mod:`metareason.train.fused_ce`)
    and ``outputs.logits`` are only computed if something reads them.
    """
    forward = hidden_forward if fused else (lambda m, **kw: m(**kw))
    rows = plan(batch["attention_mask"]) if packing else None
    if rows is not None:
        packed = pack_batch(batch["input_ids"], batch["attention_mask"], labels, 0, pad_id, rows)
        with autocast_context(autocast, device):
            outputs = forward(model, input_ids=packed.input_ids.to(device),
                              position_ids=packed.position_ids.to(device), use_cache=False)
            if fused:  # under the forward's autocast state, as the model's own output layer
                loss, n = fused_token_loss(outputs, packed.labels.to(device))
        if not fused:
            loss, n = token_loss(outputs.logits, packed.labels.to(device))
        return UnpackedOutputs(outputs, packed), loss, n, True
    # Batches are right-padded and attention is causal, so no real token attends to padding and
    # pad positions are out of the loss: no attention mask is needed, which keeps the fast
    # causal attention path.
    with autocast_context(autocast, device):
        outputs = forward(model, input_ids=batch["input_ids"].to(device), use_cache=False)
        if fused:  # under the forward's autocast state, as the model's own output layer
            loss, n = fused_token_loss(outputs, labels.to(device))
    if not fused:
        loss, n = token_loss(outputs.logits, labels.to(device))
    return outputs, loss, n, False


def encode_sft_examples(kernel, tokenizer, examples: list[dict]):
    """Token ids and prompt lengths of SFT examples, rendered as :meth:`Kernel.sft_texts` says
    (chat template, system prompt, prompt transforms)."""
    fmt = kernel.chat_format(tokenizer)
    texts = [kernel.sft_texts(e, tokenizer, fmt) for e in examples]
    append_eos = {eos for _, _, eos in texts}
    assert len(append_eos) <= 1  # one format per run
    return encode_examples(tokenizer, [p for p, _, _ in texts], [c for _, c, _ in texts],
                           kernel.config.data.max_length, append_eos=append_eos != {False})


def train_sft(kernel, resume: bool = False, dist=None, overwrite: bool = False) -> dict:
    """``dist``: a data-parallel worker (:mod:`metareason.scale.dist`); ``None``: one process."""
    from metareason.scale.dist import LOCAL

    dist = dist or LOCAL
    cfg = kernel.config
    tc = cfg.train
    run_dir = prepare_run_dir(kernel, resume, overwrite)
    seed_everything(tc.seed)
    model, tokenizer = kernel.load()
    dist.broadcast_params(model)
    device = next(model.parameters()).device

    examples = load_train_examples(kernel)
    encoded = encode_sft_examples(kernel, tokenizer, examples)
    if encoded.truncated:
        print(f"[metareason] {encoded.truncated} of {len(examples)} training examples truncated to "
              f"data.max_length={cfg.data.max_length}", file=sys.stderr)
    try:
        stream = SFTStream(examples, encoded, tc.batch_size, tc.seed, tokenizer.pad_token_id, tc.group_by_length)
    except ValueError as exc:
        raise ConfigError(f"{kernel.source}: data.train: {exc}") from None
    packing, packing_line = packing_mode(tc.packing, model)
    fused, fused_line = fused_ce_mode(tc.fused_ce, model)
    _, lean_line = lean_activations_mode(tc.lean_activations, model)
    if dist.is_main:
        print(f"[metareason] {packing_line}", file=sys.stderr)
        print(f"[metareason] {fused_line}", file=sys.stderr)
        print(f"[metareason] {lean_line}", file=sys.stderr)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)

    def save(step: int) -> Path:
        path = _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, run.state) \
            if dist.is_main else None
        dist.checkpoint_saved(step, path, dict(run.state, step=step))
        return path

    run = RunDriver(kernel, run_dir, model, tokenizer, "train", save)
    if resume:
        stream.position = int(run.resume(optimizer, scheduler)["data_position"])
        fused = fused and run.state.get(FUSED_OFF) is None  # auto turned it off before the checkpoint
    run.start(resume)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        while run.step < tc.max_steps:
            step = run.step
            model.train()
            total_loss, lm_loss_sum, term_sums, n_tokens = 0.0, 0.0, {}, 0
            for _ in range(tc.grad_accum):
                batch = dist.shard(stream.next_batch())
                labels = kernel.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch,
                                      tokenizer=tokenizer, config=cfg)
                batch["labels"] = labels
                mask = batch["attention_mask"]
                outputs, lm_loss, n, _ = forward_batch(model, batch, labels, device, tokenizer.pad_token_id,
                                                       packing, tc.autocast, fused)
                lm_loss = dist.scale_token_mean(lm_loss, n)
                loss = lm_loss
                for name, (weight, term) in collect_extra_losses(kernel, model, batch, outputs, step).items():
                    loss = loss + weight * term / dist.world_size
                    term_sums[name] = term_sums.get(name, 0.0) + float(term.detach()) / tc.grad_accum
                if fused and tc.fused_ce == "auto" and getattr(outputs, "logits_read", False):
                    fused, run.state[FUSED_OFF] = False, step  # a hook needs the logits: they exist anyway
                    print(f"[metareason] train.fused_ce=auto: off from here on (step {step + 1}): a plugin's extra "
                          "loss reads outputs.logits", file=sys.stderr)
                check_finite(dist.global_loss(loss), step, run.last_ckpt)
                (loss / tc.grad_accum).backward()
                total_loss += float(loss.detach()) / tc.grad_accum
                lm_loss_sum += float(lm_loss.detach()) / tc.grad_accum
                n_tokens += int(mask.sum())
            dist.all_reduce_grads(trainable)
            grad_norm = None
            if tc.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if dist.world_size > 1:  # the step's numbers over the whole global batch
                total_loss, lm_loss_sum, n_tokens = (dist.total(total_loss), dist.total(lm_loss_sum),
                                                     int(dist.total(n_tokens)))
                term_sums = {k: dist.total(v) / dist.world_size for k, v in sorted(term_sums.items())}

            metrics = {"train/loss": total_loss, "train/lm_loss": lm_loss_sum,
                       "train/lr": scheduler.get_last_lr()[0], "train/epoch": stream.epoch}
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            for name, value in term_sums.items():
                metrics[f"train/{name}"] = value
            run.step_done(n_tokens, metrics, _describe)
            run.after_step()
    finally:
        run.close_bar()
        unpatch(model)
    return run.finish()


def _describe(m: dict) -> tuple[dict, str]:
    line = f"loss {m['train/loss']:.4f} lr {m['train/lr']:.2e} tok/s {m['train/tokens_per_s']:.0f}"
    return {"loss": f"{m['train/loss']:.4f}", "tok_s": f"{m['train/tokens_per_s']:.0f}"}, line


def _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, state) -> Path:
    trainer_state = dict(state, data_position=stream.position)
    path = save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, trainer_state,
                           kernel.config.train.keep_last)
    kernel.pm.hook.metareason_on_checkpoint(kernel=kernel, step=step, path=str(path))
    return path
