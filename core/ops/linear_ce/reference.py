"""Reference (unfused) output projection + token cross-entropy / selective log-softmax: the spec.

Both functions materialise the full ``[tokens, vocab]`` logits, exactly as the training loops
did before the fused op (``core/train/sft.py`` ``token_loss``, ``core/train/grpo_loss.py``
``token_logps``):

* logits = ``F.linear(hidden, weight, bias)`` in the inputs' dtype (under autocast: the
  autocast dtype), then cast to fp32 (fp64 inputs stay fp64, as ``token_logps`` keeps them);
* :func:`linear_cross_entropy_reference`: ``F.cross_entropy(logits, targets,
  ignore_index, reduction="sum")``; ``mean`` divides that sum by ``max(n, 1)`` with ``n`` the
  number of non-ignored targets (so a batch with no target gives 0, not torch's NaN);
* :func:`linear_token_logps_reference`: ``logit[target] / T - logsumexp(logits / T)`` per
  token (fp32), and with ``return_entropy`` the entropy of ``softmax(logits / T)`` as
  ``logsumexp(z) - Σ softmax(z)·z``, ``z = logits / T``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N, V]`` logits of ``hidden [N, H]`` (computed in the inputs' / autocast dtype), then in
    fp32 (fp64 stays fp64)."""
    z = F.linear(hidden, weight, bias)
    return z if z.dtype == torch.float64 else z.float()


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX,
                                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``hidden [..., H] @ weight[V, H].T (+ bias)`` against ``targets [...]``."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    loss = F.cross_entropy(linear_logits(h, weight, bias), t, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / max(int((t != ignore_index).sum()), 1)


def linear_token_logps_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                                 return_entropy: bool = False):
    """``log softmax(logits / T)[target]`` ``[...]`` fp32 (and the entropies, when asked)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    z = linear_logits(h, weight, bias)
    if temperature != 1.0:
        z = z / temperature
    log_z = torch.logsumexp(z, dim=-1)
    logps = (z.gather(-1, targets.reshape(-1, 1)).squeeze(-1) - log_z).view(targets.shape)
    if not return_entropy:
        return logps
    entropies = (log_z - (torch.softmax(z, dim=-1) * z).sum(-1)).view(targets.shape)
    return logps, entropies
