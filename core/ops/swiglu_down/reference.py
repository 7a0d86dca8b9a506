"""Reference SwiGLU + down projection: the spec (what transformers' ``LlamaMLP`` computes after
its gate and up projections).

``F.linear(F.silu(gate) * up, down_weight, down_bias)``, eagerly: autograd saves ``gate`` (for
the SiLU), ``silu(gate)`` and ``up`` (for the product) and the product (for the projection),
four ``[tokens, intermediate]`` tensors per MLP.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def swiglu_down_reference(gate: torch.Tensor, up: torch.Tensor, down_weight: torch.Tensor,
                          down_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(silu(gate) * up) @ down_weight.T (+ down_bias)``; ``gate``, ``up`` ``[..., I]``,
    ``down_weight`` ``[H, I]``; under autocast as ``F.linear`` there."""
    return F.linear(F.silu(gate) * up, down_weight, down_bias)
