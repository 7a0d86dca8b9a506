"""RMSNorm (transformers' ``LlamaRMSNorm``) that saves only its input and the per-token ``rstd``.

Forward: the reference's operations in its order and dtypes (fp32 upcast, ``x * rsqrt(mean(x^2)
+ eps)``, cast back to the input dtype, times the weight), so the output is the reference's bit
for bit. Saved for backward: the input, ``rstd`` (fp32, one number per token) and the weight (a
parameter), not the normalised tensor: one ``[tokens, hidden]`` tensor per norm instead of two.
Backward recomputes ``n = (x * rstd).to(input dtype)`` elementwise, then ``grad_w = sum dy * n``,
``g = (dy * w).to(input dtype)`` in fp32, ``grad_x = rstd * (g - x * rstd^2 * mean(g * x))``.

Backends: ``reference`` (the eager spec); ``cpu`` / ``cuda``: this Function on CPU / CUDA
tensors; no Triton kernel. Autocast does not touch RMSNorm's ops, so none is needed here.
"""
from __future__ import annotations

from typing import Optional

import torch

import metareason.ops._dispatch as _dispatch
from metareason.ops.rms_norm.reference import rms_norm_reference

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _why_not(device: torch.device) -> dict[str, Optional[str]]:
    return _dispatch.torch_code_why_not(device, "rms_norm has no Triton kernel (elementwise torch ops)")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (h * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        h = x.to(torch.float32)
        gx = gw = None
        if need_w:
            n = (h * rstd).to(x.dtype)
            gw = (dy * n).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
            del n
        if need_x:
            g = (dy * weight).to(x.dtype).to(torch.float32)
            dot = (g * h).mean(-1, keepdim=True)
            gx = (rstd * (g - h * (rstd * rstd * dot))).to(x.dtype)
        return gx, gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)`` saving only ``x``
    and ``rstd`` for backward. ``x``: ``[..., H]``; ``weight``: ``[H]``."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected a floating tensor")
    if x.dim() < 1 or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"x [..., H] and weight [H] do not match: {tuple(x.shape)}, {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device}, but x is on {x.device}")
    name = _dispatch.select("rms_norm", _why_not(x.device), backend)
    if name == "reference":
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))
