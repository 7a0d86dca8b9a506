"""The MLA latent cache inside a transformers ``DynamicCache``.

Each layer's cache entry stores the refined latent ``c_kv'`` as the "key" and the rotated
``k_rope`` as the "value", both ``[B, 1, S, d]`` and grown along dim -2, so ``generate()``,
beam reordering and ``get_seq_length`` work unchanged. A standalone ``MLAAttention`` may also
be given the ``(latent [B,S,d_c], k_rope [B,S,d_r])`` tuple it returned as ``past_kv``.
"""
from __future__ import annotations

from typing import Any

import torch


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
