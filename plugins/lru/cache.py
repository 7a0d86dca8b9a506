"""The MLA latent cache inside a transformers ``DynamicCache``.

Each layer's cache entry stores the refined latent ``c_kv'`` as the "key" and the rotated
``k_rope`` as the "value", both ``[B, 1, S, d]`` and grown along dim -2, so ``generate()``,
beam reordering and ``get_seq_length`` work unchanged. A standalone ``MLAAttention`` may also
be given the ``(latent [B,S,d_c], k_rope [B,S,d_r])`` tuple it returned as ``past_kv``.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def cache_length(cache: Any, layer_idx: int) -> int:
    """Tokens already cached for ``layer_idx`` (0 without a cache)."""
    if cache is None:
        return 0
    if isinstance(cache, tuple):
        return int(cache[0].shape[-2])
    return int(cache.get_seq_length(layer_idx))


def update_latent_cache(cache: Any, layer_idx: int, latent: torch.Tensor,
                        k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append this step's ``latent [B,S,d_c]`` and ``k_rope [B,S,d_r]``; return the whole history."""
    if isinstance(cache, tuple):
        return torch.cat([cache[0], latent], dim=-2), torch.cat([cache[1], k_rope], dim=-2)
    keys, values = cache.update(latent[:, None], k_rope[:, None], layer_idx)
    return keys[:, 0], values[:, 0]


def _select_chain_states(cache: Any, index: torch.Tensor) -> None:
    """Reorder / select the per-iteration LRU states of group E (``chain.ChainStates``) with the cache."""
    store = getattr(cache, "lru_chain_states", None)
    if store is not None:
        store.select(index)


class ChainDynamicCache(DynamicCache):
    """A ``DynamicCache`` whose beam reordering and batch selection also apply to the per-iteration
    LRU states that group E (``lru_cross_read``) keeps on it as ``lru_chain_states``; the model swaps
    ``generate()``'s empty ``DynamicCache`` for one (``decode_cache: dynamic``)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        _select_chain_states(self, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        _select_chain_states(self, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        store = getattr(self, "lru_chain_states", None)
        if store is not None and store.layers:
            batch = next(iter(store.layers.values()))[0].shape[1]
            _select_chain_states(self, torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("lru_cross_read: cropping the cache (assisted decoding) is not supported")


class _PagedLayer:
    """One layer's pages: ``pool [num_blocks, BLOCK, 1, d_c + d_rope]`` plus each sequence's block list."""

    def __init__(self, batch: int, width: int, dtype: torch.dtype, device: torch.device):
        from metareason.api import MLA_DECODE_BLOCK as BLOCK

        self.block = BLOCK
        self.pool = torch.empty(0, BLOCK, 1, width, dtype=dtype, device=device)
        self.used_blocks = 0
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lens = [0] * batch
        self._table: torch.Tensor | None = None

    def _grow(self, need: int) -> None:
        if need <= self.pool.shape[0]:
            return
        size = max(need, 2 * self.pool.shape[0], 4)
        pool = self.pool.new_empty(size, *self.pool.shape[1:])
        pool[: self.pool.shape[0]] = self.pool
        self.pool = pool

    def append(self, rows: list[torch.Tensor]) -> None:
        """Append ``rows[b] [n_b, width]`` to sequence b, allocating blocks as they fill (one scatter)."""
        blocks, offsets, parts = [], [], []
        for b, r in enumerate(rows):
            n = r.shape[0]
            if n == 0:
                continue
            start, table = self.lens[b], self.tables[b]
            need = (start + n + self.block - 1) // self.block - len(table)
            if need > 0:
                self._grow(self.used_blocks + need)
                table.extend(range(self.used_blocks, self.used_blocks + need))
                self.used_blocks += need
                self._table = None
            for pos in range(start, start + n):
                blocks.append(table[pos // self.block])
                offsets.append(pos % self.block)
            parts.append(r)
            self.lens[b] = start + n
        if parts:
            dev = self.pool.device
            self.pool[torch.tensor(blocks, device=dev), torch.tensor(offsets, device=dev), 0] = torch.cat(parts)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kv_cache, block_table int32 [B, max_blocks], cache_seqlens int32 [B])`` for ``mla_decode``."""
        dev = self.pool.device
        if self._table is None:  # rebuilt only when a block was added
            width = max(1, max(len(t) for t in self.tables))
            table = torch.zeros(len(self.tables), width, dtype=torch.int32)
            for b, t in enumerate(self.tables):
                table[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
            self._table = table.to(dev)
        return self.pool, self._table, torch.tensor(self.lens, dtype=torch.int32, device=dev)

    def rows(self, b: int) -> torch.Tensor:
        """Sequence b's cached rows ``[lens[b], width]`` in order."""
        t = torch.tensor(self.tables[b], dtype=torch.long, device=self.pool.device)
        return self.pool[t].reshape(-1, self.pool.shape[-1])[: self.lens[b]]


class PagedLatentCache:
    """The MLA latent cache in 64-row pages, read by :func:`metareason.ops.mla_decode`.

    Per layer, each cached row is ``[c_kv' (d_c) | k_rope (d_rope)]`` (the layout of FlashMLA's
    ``kv_cache``); every sequence owns a list of blocks of one pool (its block table). Only real
    tokens are stored: left padding never enters the cache, so ``cache_seqlens`` is each row's
    own length and no padding mask is needed at decode. ``get_seq_length`` counts every position
    seen (padding included), which is what ``generate()`` slices its inputs by.

    ``generate()`` hands the model an empty ``DynamicCache``; the model swaps it for this one on
    the prefill step (``decode_cache: paged``) and ``generate()`` carries the returned cache on.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.layers: list[_PagedLayer | None] = [None] * num_layers
        self._seen = [0] * num_layers
        #: per layer, the (W_UK, W_UV) matrices the absorbed decode uses, taken at the first decode
        #: step: the weights are fixed while this cache lives (one generate() call)
        self.up_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen[layer_idx]

    def append(self, layer_idx: int, latent: torch.Tensor, k_rope: torch.Tensor,
               valid: torch.Tensor | None) -> _PagedLayer:
        """Store the positions of ``latent [B,S,d_c]`` / ``k_rope [B,S,d_r]`` where ``valid [B,S]``."""
        B, S = latent.shape[:2]
        layer = self.layers[layer_idx]
        if layer is None:
            layer = self.layers[layer_idx] = _PagedLayer(B, latent.shape[-1] + k_rope.shape[-1], latent.dtype,
                                                         latent.device)
        if len(layer.lens) != B:
            raise ValueError(f"cache: holds {len(layer.lens)} sequences, this step has {B}")
        rows = torch.cat([latent, k_rope.to(latent.dtype)], dim=-1).detach()
        layer.append([rows[b] if valid is None else rows[b][valid[b]] for b in range(B)])
        self._seen[layer_idx] += S
        return layer

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b becomes old sequence ``beam_idx[b]`` (rows copied, no shared pages)."""
        _select_chain_states(self, beam_idx)
        for i, layer in enumerate(self.layers):
            if layer is None:
                continue
            rows = [layer.rows(int(j)) for j in beam_idx.tolist()]
            fresh = _PagedLayer(len(rows), layer.pool.shape[-1], layer.pool.dtype, layer.pool.device)
            fresh.append(rows)
            self.layers[i] = fresh

    def bytes_allocated(self) -> int:
        return sum(l.pool.numel() * l.pool.element_size() for l in self.layers if l is not None)

    def bytes_used(self) -> int:
        """Bytes of the blocks in use (a partly filled last block counts whole)."""
        return sum(l.used_blocks * l.pool[0].numel() * l.pool.element_size() for l in self.layers if l is not None)
