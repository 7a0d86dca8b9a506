"""Padding-free packing of an SFT batch: several examples per row, no attention across them.

A right-padded batch ``[B, W]`` becomes ``[R, L]`` rows filled first-fit (longest example
first) up to ``capacity`` tokens. Each example keeps its tokens and labels; its
``position_ids`` restart at 0, and its first token's label is ``-100``, so the previous
example's last token predicts nothing across the boundary. No ``attention_mask`` is passed:
transformers (>= 5, ``masking_utils.find_packed_sequence_indices``) reads the restarts of
``position_ids`` and builds a block-diagonal causal mask for the sdpa / eager / flash kernels.

The loss is the padded batch's exactly: the same (token, label) pairs enter the sum, and the
token count is unchanged (in the padded layout an example's first label is never predicted
either: the shifted labels drop column 0). Row tails are padding with label ``-100`` and
positions restarting at 0 (a separate, ignored sequence).

Layout (measured on the quickstart model, CPU, batch 32, one thread; fwd+bwd of 8 batches):
one row of the whole batch costs ``O(total^2)`` attention and was the slowest packed layout
(9.5 s vs 3.8 s for rows of <= 256 tokens and 3.0 s for rows of <= the batch's own width,
ungrouped batches; the padded batch took 10.0 s). So rows are capped at the padded batch's
width ``W``: a packed row is never longer than a padded one, packing only removes padding
slots. With length-grouped batches there is almost no padding to remove, and the masked
attention packing needs is slower per token than the padded batch's plain causal attention
(2.1 s packed vs 1.7 s padded), so :func:`plan` keeps the padded layout unless packing
removes at least ``MIN_SAVING`` of the token slots. The loss is the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metareason.data.tokenize import IGNORE_INDEX


@dataclass
class Packed:
    input_ids: torch.Tensor      # [R, L]
    position_ids: torch.Tensor   # [R, L]
    labels: torch.Tensor         # [R, L]
    src: torch.Tensor            # flat indices into the padded [B * W] of every real token
    dst: torch.Tensor            # flat indices into the packed [R * L], same order as src
    padded_shape: tuple[int, int]

    @property
    def tokens(self) -> int:
        return int(self.src.numel())


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per row: longest first, each into the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity, n) - n)
    return rows


MIN_SAVING = 0.15  # pack a batch only when that removes at least this share of its token slots


def plan(attention_mask: torch.Tensor, min_saving: float = MIN_SAVING) -> list[list[int]] | None:
    """Rows (example indices) of the packed layout of a right-padded batch, each at most the
    batch's width; ``None`` when packing would remove less than ``min_saving`` of the slots."""
    B, W = attention_mask.shape
    lengths = attention_mask.sum(dim=1).tolist()
    rows = first_fit(lengths, W)
    L = max(sum(lengths[i] for i in row) for row in rows)
    return rows if len(rows) * L <= (1.0 - min_saving) * B * W else None


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               capacity: int, pad_id: int, rows: list[list[int]] | None = None) -> Packed:
    """Pack a right-padded batch (``attention_mask`` 1 on each row's leading real tokens) into
    ``rows`` (example indices per row; default: first-fit into rows of ``capacity`` tokens)."""
    B, W = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    rows = first_fit(lengths, capacity) if rows is None else rows
    L = max(sum(lengths[i] for i in row) for row in rows)
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=input_ids.dtype)
    pos = torch.zeros((R, L), dtype=torch.long)
    lab = torch.full((R, L), IGNORE_INDEX, dtype=labels.dtype)
    src, dst = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at: at + n] = input_ids[i, :n]
            lab[r, at: at + n] = labels[i, :n]
            lab[r, at] = IGNORE_INDEX  # nothing is predicted across the boundary
            pos[r, at: at + n] = torch.arange(n)
            src.append(torch.arange(i * W, i * W + n))
            dst.append(torch.arange(r * L + at, r * L + at + n))
            at += n
        pos[r, at:] = torch.arange(L - at)  # tail padding: its own (ignored) sequence
    return Packed(ids, pos, lab, torch.cat(src), torch.cat(dst), (B, W))


def unpack(values: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Packed per-token values ``[R, L, ...]`` back in the padded layout ``[B, W, ...]``
    (zeros at padding), differentiably: for hooks that read outputs per batch row."""
    B, W = packed.padded_shape
    flat = values.reshape(-1, *values.shape[2:])
    out = flat.new_zeros((B * W, *values.shape[2:]))
    out = out.index_copy(0, packed.src.to(values.device), flat.index_select(0, packed.dst.to(values.device)))
    return out.reshape(B, W, *values.shape[2:])


class UnpackedOutputs:
    """The model's outputs as hooks expect them for the padded batch: ``logits`` are unpacked
    to ``[B, W, V]`` on first access (nothing is copied when no hook reads them); any other
    attribute is the model output's own."""

    def __init__(self, outputs, packed: Packed):
        self._outputs, self._packed, self._logits = outputs, packed, None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = unpack(self._outputs.logits, self._packed)
        return self._logits

    def __getattr__(self, name):
        return getattr(self._outputs, name)

    def __getitem__(self, key):
        return self.logits if key == "logits" else self._outputs[key]


ATTENTION_WITH_PACKING = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def packing_support(model) -> tuple[bool, str]:
    """Whether the model's attention keeps packed examples apart through ``position_ids``.

    True only for transformers' own model classes whose modeling module builds its mask with
    ``masking_utils.create_causal_mask`` (which detects packed sequences) and whose attention
    implementation is one that uses that mask. Anything else (a model class of our own, e.g.
    ``deepseek_mla``, which builds its own mask) is reported unsupported.
    """
    import importlib

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    module = type(base).__module__
    if not module.startswith("transformers.models."):
        return False, f"{type(base).__name__} is not a transformers model class"
    try:
        modeling = importlib.import_module(module)
        import transformers.masking_utils as mu
    except ImportError:
        return False, "transformers.masking_utils is not available"
    if not hasattr(mu, "find_packed_sequence_indices") or getattr(modeling, "create_causal_mask", None) is not \
            mu.create_causal_mask:
        return False, f"{type(base).__name__} does not build its mask with masking_utils.create_causal_mask"
    impl = getattr(base.config, "_attn_implementation", None)
    if impl not in ATTENTION_WITH_PACKING:
        return False, f"attention implementation {impl!r} is not one of {', '.join(ATTENTION_WITH_PACKING)}"
    return True, f"{type(base).__name__}, {impl} attention"
