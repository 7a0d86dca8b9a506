"""The running batch's KV cache: rows left-aligned to one width that grows with the rows.

Each layer's keys/values live in a buffer ``[rows, heads, capacity, head_dim]`` of which columns
``start:end`` are in use; a row shorter than the batch is padded on the left (masked out by
``mask``). A decode step writes one column in place (the capacity doubles when full, so a step
never copies the cache), admitting rows copies once into a wider or taller buffer, and retiring
rows keeps the others (one gather) and drops the leading columns nobody uses any more. Nothing is
reserved for tokens a row has not generated yet. A step commits only when :meth:`RowsKV.commit`
is called, so a step that raised leaves the cache as it was.
"""
from __future__ import annotations

from typing import Optional

import torch

from transformers.cache_utils import DynamicCache, DynamicLayer


class _StepLayer(DynamicLayer):
    """One layer of the batch cache as a model sees it during a step: ``update`` writes the new
    column into the buffer and returns the in-use columns (what ``torch.cat`` would give)."""

    def __init__(self, kv: "RowsKV", index: int):
        super().__init__()
        self.kv, self.index = kv, index
        self.keys = kv.k[index][..., kv.start: kv.end, :]
        self.values = kv.v[index][..., kv.start: kv.end, :]
        self.is_initialized = True
        self.device = self.keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        kv, i = self.kv, self.index
        m = key_states.shape[-2]
        kv.ensure(m)
        kv.k[i][..., kv.end: kv.end + m, :] = key_states
        kv.v[i][..., kv.end: kv.end + m, :] = value_states
        self.keys = kv.k[i][..., kv.start: kv.end + m, :]
        self.values = kv.v[i][..., kv.start: kv.end + m, :]
        return self.keys, self.values


class RowsKV:
    """Per-layer key/value buffers of the running rows plus their attention mask."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], mask: torch.Tensor, start: int, end: int):
        self.k, self.v, self.mask, self.start, self.end = k, v, mask, start, end

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.end - self.start

    @classmethod
    def from_prefill(cls, cache, mask: torch.Tensor) -> "RowsKV":
        """The cache of a left-padded prefill batch (``mask [B, W]``: 0 on padding). Padding
        columns are zeroed: the keys and values the model computed there are masked out, but a
        non-finite one would still poison the attention's weighted sum (0 x NaN)."""
        k = [layer.keys for layer in cache.layers]
        v = [layer.values for layer in cache.layers]
        if not bool(mask.all()):
            pad = (mask == 0)[:, None, :, None]
            k = [t.masked_fill(pad, 0) for t in k]
            v = [t.masked_fill(pad, 0) for t in v]
        return cls(k, v, mask.long(), 0, mask.shape[1])

    def ensure(self, m: int) -> None:
        """Room for ``m`` more columns (capacity doubles, so growth costs O(1) amortised per step)."""
        cap = self.mask.shape[1]
        if self.end + m <= cap:
            return
        new_cap = max(2 * self.width, self.width + m, 16)
        self._relayout(self.rows, new_cap, self.width, [(slice(None), slice(None))])

    def _relayout(self, rows: int, cap: int, width: int, moves) -> None:
        """New buffers ``[rows, ..., cap]`` holding ``width`` columns right-aligned at ``width``;
        ``moves``: ``(dst rows, src rows)`` of this cache copied over (right-aligned)."""
        old_w = self.width
        k2 = [t.new_zeros(rows, t.shape[1], cap, t.shape[3]) for t in self.k]
        v2 = [t.new_zeros(rows, t.shape[1], cap, t.shape[3]) for t in self.v]
        mask2 = self.mask.new_zeros(rows, cap)
        for dst, src in moves:
            for a, b in zip(k2 + v2, self.k + self.v):
                a[dst, :, width - old_w: width, :] = b[src, :, self.start: self.end, :]
            mask2[dst, width - old_w: width] = self.mask[src, self.start: self.end]
        self.k, self.v, self.mask, self.start, self.end = k2, v2, mask2, 0, width

    def add(self, other: "RowsKV") -> None:
        """Append ``other``'s rows (the narrower side padded on the left)."""
        width = max(self.width, other.width)
        rows = self.rows + other.rows
        old_rows = self.rows
        self._relayout(rows, max(2 * width, 16), width, [(slice(0, old_rows), slice(None))])
        for a, b in zip(self.k + self.v, other.k + other.v):
            a[old_rows:, :, width - other.width: width, :] = b[:, :, other.start: other.end, :]
        self.mask[old_rows:, width - other.width: width] = other.mask[:, other.start: other.end]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order; a row listed twice is copied, as for ``n`` samples
        of one prompt), then drop leading columns that are padding in all."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]
        self.mask = self.mask.index_select(0, idx)
        if rows:
            used = self.mask[:, self.start: self.end].any(0).nonzero()
            self.start += int(used[0]) if used.numel() else self.width
        else:
            self.start = self.end = 0

    def subset(self, rows: list[int]) -> "RowsKV":
        """A copy of ``rows`` (to run a step for some rows alone)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        sel = slice(self.start, self.end)
        return RowsKV([t[:, :, sel].index_select(0, idx) for t in self.k],
                      [t[:, :, sel].index_select(0, idx) for t in self.v],
                      self.mask[:, sel].index_select(0, idx), 0, self.width)

    def take_column(self, rows: list[int], sub: "RowsKV") -> None:
        """Copy the column ``sub``'s step wrote (its ``end``) into ``rows``' column ``end``."""
        self.ensure(1)
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for a, b in zip(self.k + self.v, sub.k + sub.v):
            a[idx, :, self.end, :] = b[:, :, sub.end, :]

    def step_cache(self) -> tuple[DynamicCache, Optional[torch.Tensor]]:
        """A ``DynamicCache`` over the buffers for a one-token step, and the step's attention mask
        ``[rows, width + 1]`` (``None`` when no row is padded, as ``generate`` gives the model)."""
        self.ensure(1)
        cache = DynamicCache()
        cache.layers = [_StepLayer(self, i) for i in range(len(self.k))]
        self.mask[:, self.end] = 1
        mask = self.mask[:, self.start: self.end + 1]
        return cache, (None if bool(mask.all()) else mask)

    def commit(self, m: int = 1) -> None:
        """The step's ``m`` written columns are now in use."""
        self.end += m
