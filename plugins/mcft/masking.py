"""Critique masking: label tokens inside ``<think>`` dropped from the loss at random.

Each label position ``t`` with ``open + 1 + offset <= t < close`` (``open``/``close`` the
positions of the first ``<think>`` / the next ``</think>`` in the completion; to the end of the
row when ``</think>`` is missing) and a label that is still in the loss is set to ``-100`` with
probability ``threshold``. Because labels are shifted inside the loss, dropping position ``t``
removes the prediction of token ``t`` (the logits at ``t - 1``) from the loss.

The draws of an example come from a ``torch.Generator`` seeded with a stable hash (BLAKE2b) of
``(train.seed, example id, epoch)``: the same example in the same epoch is masked the same way
in every run and process, and differently in the next epoch.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

IGNORE_INDEX = -100


def example_seed(example_key: str, epoch: int, seed: int = 0) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{example_key}\x1f{epoch}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def example_key(example: Optional[dict]) -> str:
    """The example's id; without one, its prompt and completion text."""
    if not example:
        return ""
    if example.get("id") is not None:
        return str(example["id"])
    return f"{example.get('prompt', '')}\x1e{example.get('completion', '')}"


def think_spans(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, think_id: int,
                think_end_id: int) -> list[tuple[int, int]]:
    """Per row ``(open, close)``: positions of the completion's first ``<think>`` and the next
    ``</think>`` (``close = T`` when missing); ``(-1, -1)`` for a row without ``<think>``."""
    B, T = input_ids.shape
    ids = input_ids.cpu()
    spans = []
    for b in range(B):
        start = int(prompt_lengths[b])
        opens = (ids[b, start:] == think_id).nonzero()
        if not len(opens):
            spans.append((-1, -1))
            continue
        open_pos = start + int(opens[0])
        closes = (ids[b, open_pos + 1:] == think_end_id).nonzero()
        spans.append((open_pos, open_pos + 1 + int(closes[0]) if len(closes) else T))
    return spans


def maskable_positions(input_ids: torch.Tensor, labels: torch.Tensor, prompt_lengths: torch.Tensor,
                       think_id: int, think_end_id: int, offset: int) -> torch.Tensor:
    """``[B, T]`` bool: label positions inside ``<think>`` (after ``offset`` tokens) still in the loss."""
    out = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, (open_pos, close_pos) in enumerate(think_spans(input_ids, prompt_lengths, think_id, think_end_id)):
        lo = open_pos + 1 + offset
        if open_pos >= 0 and lo < close_pos:
            out[b, lo:close_pos] = True
    return out & (labels.cpu() != IGNORE_INDEX)


def critique_mask(input_ids: torch.Tensor, labels: torch.Tensor, prompt_lengths: torch.Tensor,
                  examples: list[dict], epoch: int, *, think_id: int, think_end_id: int, threshold: float,
                  offset: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_labels, dropped)``: ``labels`` with the drawn positions set to ``-100``, and the
    ``[B, T]`` bool mask of the positions dropped."""
    candidates = maskable_positions(input_ids, labels, prompt_lengths, think_id, think_end_id, offset)
    dropped = torch.zeros_like(candidates)
    if threshold > 0:
        spans = think_spans(input_ids, prompt_lengths, think_id, think_end_id)
        for b, (open_pos, close_pos) in enumerate(spans):
            if not bool(candidates[b].any()):
                continue
            ex = examples[b] if b < len(examples) else None
            g = torch.Generator().manual_seed(example_seed(example_key(ex), epoch, seed))
            # one draw per token of the think span: the mask depends on the example, not on the
            # batch it lands in (padding width, prompt length)
            draws = torch.rand(close_pos - open_pos - 1, generator=g) < threshold
            dropped[b, open_pos + 1: close_pos] = draws & candidates[b, open_pos + 1: close_pos]
    new = labels.clone()
    new[dropped.to(labels.device)] = IGNORE_INDEX
    return new, dropped
