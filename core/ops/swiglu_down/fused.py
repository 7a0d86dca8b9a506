"""SwiGLU + down projection that saves only ``gate`` and ``up`` for backward.

Forward: ``y = (silu(gate) * up) @ W.T (+ b)``, the same operations as the reference, so the
values are the reference's bit for bit. Saved for backward: ``gate``, ``up`` and the weight
(a parameter, or its autocast copy, which the reference saves too), not ``silu(gate)`` and the
product: two ``[tokens, intermediate]`` tensors per MLP instead of four. Backward recomputes
``s = silu(gate)`` and ``h = s * up`` elementwise (no matmul is recomputed), then
``grad_W = dy^T h`` (over all tokens), ``grad_b = sum dy``, ``grad_h = dy W``,
``grad_up = grad_h * s``, ``grad_gate = silu'(gate) * grad_h * up`` -- the reference's autograd
operations in its order, so fp32 gradients match it to rounding.

Under autocast the weight and bias are cast to the autocast dtype first and the product to it
(what ``F.linear`` does there); the op runs with autocast off. Backends: ``reference`` (the
eager spec); ``cpu`` / ``cuda``: this Function on CPU / CUDA tensors (torch's GEMMs and
elementwise kernels; the memory saved is the point, not a new kernel); no Triton kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import metareason.ops._dispatch as _dispatch
from metareason.ops.swiglu_down.reference import swiglu_down_reference

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _why_not(device: torch.device) -> dict[str, Optional[str]]:
    return _dispatch.torch_code_why_not(
        device, "swiglu_down has no Triton kernel (an elementwise recompute around torch's GEMMs)")


def _check(gate, up, weight, bias) -> None:
    for name, t in (("gate", gate), ("up", up), ("down_weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected a floating tensor, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up: shapes differ, {tuple(gate.shape)} vs {tuple(up.shape)}")
    if gate.dim() < 1 or weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"gate [..., I] and down_weight [H, I] do not match: {tuple(gate.shape)}, "
                         f"{tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"down_bias: expected a [{weight.shape[0]}] tensor or None")
    for name, t in (("up", up), ("down_weight", weight), ("down_bias", bias)):
        if t is not None and t.device != gate.device:
            raise ValueError(f"{name}: on {t.device}, but gate is on {gate.device}")


def _product(gate, up, dtype):
    s = F.silu(gate)
    return s, (s * up).to(dtype)


class _SwigluDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        _, h = _product(gate, up, weight.dtype)
        y = F.linear(h, weight, bias)
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        need_g, need_u, need_w, need_b = ctx.needs_input_grad[:4]
        dy = dy.to(weight.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        s, h = _product(gate, up, weight.dtype)
        gw = dy2.t().mm(h.reshape(-1, h.shape[-1])) if need_w else None
        gb = dy2.sum(0) if need_b and ctx.has_bias else None
        del h
        gg = gu = None
        if need_g or need_u:
            gh = dy.matmul(weight)  # [..., I]
            product_dtype = torch.promote_types(gate.dtype, up.dtype)
            gh = gh.to(product_dtype)
            if need_u:
                gu = (gh * s).to(up.dtype)
            del s
            if need_g:
                gg = torch.ops.aten.silu_backward(gh * up, gate).to(gate.dtype)
        return gg, gu, gw, gb


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, down_weight: torch.Tensor,
                down_bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """``(silu(gate) * up) @ down_weight.T (+ down_bias)`` saving only ``gate`` and ``up``
    (and the weight) for backward. ``gate``, ``up``: ``[..., I]``; ``down_weight``: ``[H, I]``;
    ``down_bias``: ``[H]`` or None. Returns ``[..., H]``, as the reference."""
    _check(gate, up, down_weight, down_bias)
    name = _dispatch.select("swiglu_down", _why_not(gate.device), backend)
    if name == "reference":
        return swiglu_down_reference(gate, up, down_weight, down_bias)
    dev = gate.device.type
    weight, bias = down_weight, down_bias
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif weight.dtype != torch.promote_types(gate.dtype, up.dtype):
        raise ValueError(f"down_weight: dtype {weight.dtype} does not match the product's "
                         f"{torch.promote_types(gate.dtype, up.dtype)} (outside autocast)")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"down_bias: dtype {bias.dtype} does not match down_weight's {weight.dtype}")
    with torch.autocast(dev, enabled=False):
        return _SwigluDown.apply(gate, up, weight, bias)
