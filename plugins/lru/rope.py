"""Decoupled RoPE: rotary position embedding on the ``rope_head_dim`` dimensions only.

MLA keeps position out of the compressed latent (so it can be cached and, at decode time,
absorbed into the query); position enters through a separate small key ``k_rope`` shared by
all heads and matching per-head query dimensions. The frequencies are computed on the fly
(a handful of numbers), so there is no buffer to lose when weights load onto a meta device.
"""
from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """``cos, sin`` of shape ``[B, S, dim]`` for integer positions ``[B, S]`` (or ``[S]``)."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, S, dim]`` by ``cos/sin [B, S, dim]`` (broadcast over heads)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
