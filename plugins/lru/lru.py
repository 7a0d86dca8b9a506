"""The Latent Reasoning Unit: iterative GRU-gated refinement of each token's KV latent with
adaptive halting (ACT). The recurrence itself is the fused op ``metareason.ops.lru_act``
(definition in ``core/ops/lru_act/reference.py``; C++ on the CPU, CUDA on GPUs), so this module
only owns the parameters and packages the op's outputs.

    lru = LatentReasoningUnit(LRUConfig(latent_dim=512, max_iterations=8, halt_threshold=0.99))
    refined_latent, out = lru(latent)          # latent [..., 512]
    out.halt_probs, out.ponder_cost, out.num_iterations, out.residuals
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from metareason.api import LRUParams, lru_act
from metareason.plugins.lru.config import LRUConfig


@dataclass
class LRUOutput:
    """Per-token statistics of one LRU call (leading dims = the latent's, e.g. ``[B, S]``).

    ``halt_probs [..., N]``: p_n for the steps a token ran, zero after it halted.
    ``num_iterations [...]``: steps run (int64). ``remainders [...]``: R = 1 − Σ_{i<n} p_i
    (0 in fixed mode). ``ponder_cost [...]``: n + R (ACT). ``residuals [..., N]``:
    ||h_n − h_{n−1}||, zero after halting. All but ``num_iterations`` carry gradients.
    """

    halt_probs: torch.Tensor
    ponder_cost: torch.Tensor
    num_iterations: torch.Tensor
    remainders: torch.Tensor
    residuals: torch.Tensor

    def first_last_residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual of each token's first and last iteration (``[...]`` each)."""
        last_idx = (self.num_iterations.clamp(min=1) - 1).unsqueeze(-1)
        return self.residuals[..., 0], self.residuals.gather(-1, last_idx).squeeze(-1)


class LatentReasoningUnit(nn.Module):
    """Parameters of the recurrence (shapes in ``metareason.ops.lru_act.params``) and the call."""

    def __init__(self, config: LRUConfig):
        super().__init__()
        self.config = config
        d = config.latent_dim
        self.W = nn.Parameter(torch.empty(2 * d, d))
        self.U = nn.Parameter(torch.empty(2 * d, d))
        self.b = nn.Parameter(torch.empty(2 * d))
        self.W_h = nn.Parameter(torch.empty(d, d))
        self.U_h = nn.Parameter(torch.empty(d, d))
        self.b_h = nn.Parameter(torch.empty(d))
        self.w_p = nn.Parameter(torch.empty(d))
        self.b_p = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ U(±gain/√d), biases 0, halting bias ``halt_bias_init`` (skips loaded tensors)."""
        bound = self.config.init_gain / math.sqrt(self.config.latent_dim)
        with torch.no_grad():
            for w in (self.W, self.U, self.W_h, self.U_h, self.w_p):
                init.uniform_(w, -bound, bound)
            init.zeros_(self.b)
            init.zeros_(self.b_h)
            init.constant_(self.b_p, float(self.config.halt_bias_init))

    def params(self) -> LRUParams:
        return LRUParams(self.W, self.U, self.b, self.W_h, self.U_h, self.b_h, self.w_p, self.b_p)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, LRUOutput]:
        cfg = self.config
        # The op computes in fp32 at least whatever the dtypes of latent and params.
        res = lru_act(latent.contiguous(), self.params(), cfg.max_iterations, cfg.halt_threshold,
                      fixed_iterations=cfg.fixed_iterations)
        out = LRUOutput(halt_probs=res.halt_probs, ponder_cost=res.num_iterations.to(res.remainders.dtype) + res.remainders,
                        num_iterations=res.num_iterations, remainders=res.remainders, residuals=res.residuals)
        return res.out, out

    def extra_repr(self) -> str:
        c = self.config
        mode = "fixed" if c.fixed_iterations else f"ACT threshold {c.halt_threshold}"
        return f"latent_dim={c.latent_dim}, max_iterations={c.max_iterations}, {mode}"
