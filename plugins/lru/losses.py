"""The seed's auxiliary loss terms, computed from ``outputs.lru_stats``.

Every term is a mean over real tokens (padding masked) and over the layers that have an LRU:

* ``stability`` — residuals should shrink across iterations. For each token and each pair of
  consecutive iterations it ran, the contraction ratio ``r_n / sg(r_{n−1})`` with
  ``r_n = ||h_n − h_{n−1}||`` and ``sg`` = stop-gradient; the term is the mean ratio (< 1 when
  the refinement converges). The stop-gradient keeps the term from rewarding a larger first
  step; tokens that ran a single iteration have no pair and do not count.
* ``sparsity`` — Hoyer-square of the refined latent ``c_kv'`` of each token,
  ``(||x||_1)^2 / ||x||_2^2``, divided by the latent width ``d`` so it lies in ``[1/d, 1]``
  (1/d: one active unit, 1: all units equal in magnitude).
* ``ponder`` — the ACT ponder cost ``n + R`` (iterations plus remainder); its gradient reaches
  the halting probabilities through ``R``. Constant (= N) in fixed-iteration mode.
"""
from __future__ import annotations

from typing import Optional

import torch

from metareason.plugins.lru.stats import LRUForwardStats

EPS = 1e-6
TERMS = ("stability", "sparsity", "ponder")


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of ``values [B, S, ...]`` over positions where ``mask [B, S]``."""
    if mask is None:
        return values.sum(), torch.tensor(float(values.numel()), device=values.device)
    m = mask.reshape(mask.shape + (1,) * (values.dim() - mask.dim())).to(values.dtype)
    m = m.expand_as(values)
    return (values * m).sum(), m.sum()


def stability_terms(residuals: torch.Tensor, num_iterations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contraction ratios ``[..., N-1]`` and the mask of pairs a token really ran."""
    n = residuals.shape[-1]
    ratios = residuals[..., 1:] / (residuals[..., :-1].detach() + EPS)
    steps = torch.arange(1, n, device=residuals.device)
    valid = steps < num_iterations.unsqueeze(-1)  # pair (n-1, n) exists when n <= num_iterations
    return ratios, valid


def hoyer_square(x: torch.Tensor) -> torch.Tensor:
    """``(||x||_1)^2 / (d · ||x||_2^2)`` over the last dim, in ``[1/d, 1]``."""
    x = x.float()
    return x.abs().sum(-1).pow(2) / (x.pow(2).sum(-1) * x.shape[-1] + EPS)


def lru_loss_terms(stats: LRUForwardStats, token_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Unweighted ``{"stability", "sparsity", "ponder"}`` (scalars); ``{}`` without an LRU."""
    if not stats.layers:
        return {}
    mask = stats.mask(token_mask)
    sums = {t: [] for t in TERMS}
    counts = {t: [] for t in TERMS}
    for layer in stats.layers:
        out = layer.lru
        ratios, valid = stability_terms(out.residuals.float(), out.num_iterations)
        pair_mask = valid if mask is None else valid & mask[..., None]
        sums["stability"].append((ratios * pair_mask).sum())
        counts["stability"].append(pair_mask.sum())
        for name, values in (("sparsity", hoyer_square(layer.latent)), ("ponder", out.ponder_cost.float())):
            s, c = _masked_mean(values, mask)
            sums[name].append(s)
            counts[name].append(c)
    return {t: torch.stack(sums[t]).sum() / torch.stack(counts[t]).sum().clamp(min=1) for t in TERMS}


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> Optional[torch.Tensor]:
    total = None
    for name, value in terms.items():
        w = float(weights.get(name, 0.0))
        if w:
            total = w * value if total is None else total + w * value
    return total
