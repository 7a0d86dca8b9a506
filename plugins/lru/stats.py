"""What one forward pass of a ``deepseek_mla`` model tells about its LRUs.

``outputs.lru_stats`` (a :class:`LRUForwardStats`) holds, for every layer with an LRU, the
refined latent and the :class:`~metareason.plugins.lru.lru.LRUOutput`; the loss terms
(:mod:`metareason.plugins.lru.losses`) and the per-level evaluation read it. Padding is left
out through ``token_mask`` (``[B, S]``, True = real token).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from metareason.plugins.lru.lru import LRUOutput


@dataclass
class LRULayerStats:
    layer_idx: int
    latent: torch.Tensor  # refined latent c_kv' [B, S, d_c]
    lru: LRUOutput


@dataclass
class LRUForwardStats:
    layers: list[LRULayerStats] = field(default_factory=list)
    token_mask: Optional[torch.Tensor] = None  # [B, S] bool, None = every position is real

    def mask(self, token_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        m = token_mask if token_mask is not None else self.token_mask
        if m is None or not self.layers:
            return None
        return m.to(device=self.layers[0].latent.device, dtype=torch.bool)


def per_token(stats: LRUForwardStats, token_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per real token, averaged over LRU layers (detached, float32): ``iterations``,
    ``first_residual``, ``last_residual``, ``ponder``. Shapes ``[B, S]``; masked positions NaN."""
    if not stats.layers:
        return {}
    iters, first, last, ponder = [], [], [], []
    for layer in stats.layers:
        f, l = layer.lru.first_last_residuals()
        iters.append(layer.lru.num_iterations.float())
        first.append(f.detach().float())
        last.append(l.detach().float())
        ponder.append(layer.lru.ponder_cost.detach().float())
    out = {name: torch.stack(v).mean(0) for name, v in
           (("iterations", iters), ("first_residual", first), ("last_residual", last), ("ponder", ponder))}
    m = stats.mask(token_mask)
    if m is not None:
        out = {k: v.masked_fill(~m, float("nan")) for k, v in out.items()}
    return out
