"""Front of the fused LRU/ACT op: input checks, backend dispatch, autograd.

The compiled forwards (``metareason._C.lru_act_forward[_cuda]``) compute on the compacted
active set and build no graph; backward re-runs the recurrence with the same halting steps
in :mod:`metareason.ops.lru_act.compact` and differentiates that.
"""
from __future__ import annotations

import math

import torch

import metareason.ops._dispatch as _dispatch
from metareason.ops.lru_act.compact import lru_act_given_halting
from metareason.ops.lru_act.params import LRUParams
from metareason.ops.lru_act.reference import LRUActOutput, compute_dtype, lru_act_reference

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(x, params, max_iterations, halt_threshold) -> LRUParams:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape [..., d] with d > 0, got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x: expected a float32/float64/bfloat16/float16 tensor, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x: must be contiguous (call .contiguous())")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations: expected an int >= 1, got {max_iterations!r}")
    if not isinstance(halt_threshold, (int, float)) or not math.isfinite(halt_threshold) or halt_threshold <= 0:
        raise ValueError(f"halt_threshold: expected a finite number > 0, got {halt_threshold!r}")
    if not isinstance(params, LRUParams):
        if isinstance(params, (tuple, list)) and len(params) == len(LRUParams._fields):
            params = LRUParams(*params)
        else:
            raise ValueError("params: expected an LRUParams (W, U, b, W_h, U_h, b_h, w_p, b_p)")
    d = x.shape[-1]
    shapes = {"W": (2 * d, d), "U": (2 * d, d), "b": (2 * d,), "W_h": (d, d), "U_h": (d, d),
              "b_h": (d,), "w_p": (d,), "b_p": ()}
    fixed = []
    for name, shape in shapes.items():
        t = getattr(params, name)
        if name == "b_p" and isinstance(t, (int, float)):
            t = torch.tensor(float(t), dtype=x.dtype, device=x.device)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"params.{name}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"params.{name}: expected shape {shape} for d={d}, got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"params.{name}: expected a floating dtype, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"params.{name}: on {t.device}, but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"params.{name}: must be contiguous")
        fixed.append(t)
    return LRUParams(*fixed)


def _why_not(device: torch.device, explicit: str | None = None) -> dict[str, str | None]:
    return {
        "reference": None,
        "cpu": _dispatch.extension_why_not(device, "cpu", "lru_act_forward"),
        "cuda": _dispatch.extension_why_not(device, "cuda", "lru_act_forward_cuda"),
        "triton": _dispatch.triton_why_not(device, explicit),
    }


def _forward_fn(backend: str):
    if backend == "triton":
        from metareason.ops.lru_act.triton_kernel import lru_act_forward_triton

        return lru_act_forward_triton
    from metareason.ops._extension import extension

    ext = extension()
    return ext.lru_act_forward if backend == "cpu" else ext.lru_act_forward_cuda


class _LRUActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, max_iterations, halt_threshold, fixed, x, *params):
        ct = compute_dtype(x.dtype)
        xc = x.to(ct).contiguous()
        pc = [t.to(ct).contiguous() for t in params]
        out, hp, nit, rem, res, _rows = _forward_fn(backend)(
            xc, *pc[:7], float(pc[7]), max_iterations, float(halt_threshold), bool(fixed)
        )
        ctx.save_for_backward(x, *params, nit)
        ctx.max_iterations, ctx.fixed = max_iterations, fixed
        ctx.mark_non_differentiable(nit)
        return out.to(x.dtype), hp, nit, rem, res

    @staticmethod
    def backward(ctx, g_out, g_hp, _g_nit, g_rem, g_res):
        *inputs, nit = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
            outs = lru_act_given_halting(leaves[0], LRUParams(*leaves[1:]), nit, ctx.max_iterations, ctx.fixed)
            pairs = [(o, g) for o, g in zip(outs, (g_out, g_hp, g_rem, g_res)) if g is not None and o.requires_grad]
            wanted = [t for t, need in zip(leaves, needs) if need]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g.to(o.dtype) for o, g in pairs],
                                             allow_unused=True)) if pairs and wanted else iter(())
        result = [next(grads, None) if need else None for need in needs]
        return (None, None, None, None, *result)


def lru_act(
    x: torch.Tensor,
    params: LRUParams,
    max_iterations: int,
    halt_threshold: float,
    fixed_iterations: bool = False,
    *,
    backend: str | None = None,
) -> LRUActOutput:
    """LRU/ACT recurrence (definition in :mod:`metareason.ops.lru_act.reference`).

    ``x``: [..., d] (flattened to tokens). Returns ``LRUActOutput(out, halt_probs,
    num_iterations, remainders, residuals)``. Differentiable w.r.t. x and all params,
    including through halt_probs / remainders / residuals; the halting decision is not.
    ``backend`` overrides ``METAREASON_OPS`` for this call.
    """
    params = _check(x, params, max_iterations, halt_threshold)
    name = _dispatch.select("lru_act", _why_not(x.device, backend), backend)
    d = x.shape[-1]
    lead = x.shape[:-1]
    if name == "reference" or x.numel() == 0:
        return lru_act_reference(x, params, max_iterations, halt_threshold, fixed_iterations)
    out, hp, nit, rem, res = _LRUActFunction.apply(
        name, max_iterations, float(halt_threshold), bool(fixed_iterations), x.reshape(-1, d), *params
    )
    return LRUActOutput(
        out.reshape(*lead, d),
        hp.reshape(*lead, max_iterations),
        nit.reshape(lead),
        rem.reshape(lead),
        res.reshape(*lead, max_iterations),
    )
