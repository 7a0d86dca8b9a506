"""Triton epilogues of the fused linear cross-entropy: one program per token row of a chunk.

The chunking and the three GEMMs per chunk (logits ``h·Wᵀ``, ``∂h = g·W``, ``∂W += gᵀ·h``) stay
in :mod:`metareason.ops.linear_ce.fused` (cuBLAS on a GPU); these kernels replace the torch
element-wise passes over the chunk's ``[rows, V]`` logits (max, exp, sum, log, softmax, scatter:
five or more reads and writes of the buffer) by one streaming read for the statistics and one
read + write that turns the logits into their gradient *in place* (the layout of Liger-Kernel's
fused linear cross-entropy). Online softmax over ``BLOCK_V``-wide column blocks, in the logits'
dtype (fp32, or fp64 for fp64 inputs).

* :func:`ce_rows_` — per row ``lse - z[target]``; optionally overwrites ``z`` with
  ``softmax(z) - onehot(target)`` (the SFT loss and its gradient);
* :func:`logps_rows` — per row ``z[target] - lse``, ``lse`` and optionally the entropy
  ``lse - Σ softmax(z)·z`` (GRPO's selective log-softmax; ``z`` already divided by T);
* :func:`logps_grad_rows_` — overwrites ``z`` with ``∂/∂logits`` of ``Σ g·logp + g_ent·H``
  (including the ``1/T``).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096


def _block(V: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 16)))


@triton.jit
def _row_stats(z_row, V, BLOCK_V: tl.constexpr, WANT_SUM_PZ: tl.constexpr):
    """(max, Σ exp(z - max), Σ exp(z - max)·z) of one row, online over column blocks."""
    dt = z_row.dtype.element_ty  # typed scalars: the loop-carried values keep one dtype (fp32 or fp64)
    m = tl.full([], float("-inf"), dt)
    d = tl.zeros([], dt)
    s = tl.zeros([], dt)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = tl.load(z_row + offs, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        d = d * alpha + tl.sum(e, 0)
        if WANT_SUM_PZ:
            s = s * alpha + tl.sum(e * tl.where(ok, x, 0.0), 0)  # masked: e = 0, x = -inf
        m = m_new
    return m, d, s


@triton.jit
def _ce_kernel(z_ptr, stride, t_ptr, loss_ptr, V, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    t = tl.load(t_ptr + row)
    m, d, _s = _row_stats(z_row, V, BLOCK_V, False)
    lse = m + tl.log(d)
    picked = tl.load(z_row + t)
    tl.store(loss_ptr + row, lse - picked)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            ok = offs < V
            x = tl.load(z_row + offs, mask=ok, other=0.0)
            p = tl.exp(x - lse)
            tl.store(z_row + offs, tl.where(offs == t, p - 1.0, p), mask=ok)


@triton.jit
def _logps_kernel(z_ptr, stride, t_ptr, logp_ptr, lse_ptr, ent_ptr, V, BLOCK_V: tl.constexpr,
                  WANT_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    t = tl.load(t_ptr + row)
    m, d, s = _row_stats(z_row, V, BLOCK_V, WANT_ENT)
    lse = m + tl.log(d)
    tl.store(logp_ptr + row, tl.load(z_row + t) - lse)
    tl.store(lse_ptr + row, lse)
    if WANT_ENT:
        tl.store(ent_ptr + row, lse - s / d)


@triton.jit
def _logps_grad_kernel(z_ptr, stride, t_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, V, inv_t,
                       BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    t = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    ge = 0.0
    mean_z = 0.0
    if HAS_ENT:
        ge = tl.load(ge_ptr + row)
        mean_z = lse - tl.load(ent_ptr + row)  # E_p[z] = lse - H
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        x = tl.load(z_row + offs, mask=ok, other=0.0)
        p = tl.exp(x - lse)
        # d logp / dz = onehot - p;  d H / dz = -p * (z - E_p[z])
        if HAS_ENT:
            grad = -p * ((x - mean_z) * ge + g)
        else:
            grad = -p * g
        grad = tl.where(offs == t, grad + g, grad)
        tl.store(z_row + offs, grad * inv_t, mask=ok)


def _rows(z: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError("linear_ce triton: logits must be a [rows, V] tensor with contiguous rows")
    if targets.shape != (z.shape[0],) or not targets.is_contiguous():
        raise ValueError("linear_ce triton: targets must be a contiguous [rows] tensor")
    return z.shape[0], z.shape[1]


def ce_rows_(z: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> torch.Tensor:
    """Per-row ``logsumexp(z) - z[target]``; with ``write_grad`` ``z`` becomes
    ``softmax(z) - onehot(target)`` in place."""
    n, V = _rows(z, targets)
    loss = torch.empty(n, dtype=z.dtype, device=z.device)
    if n:
        _ce_kernel[(n,)](z, z.stride(0), targets, loss, V, BLOCK_V=_block(V), WRITE_GRAD=bool(write_grad))
    return loss


def logps_rows(z: torch.Tensor, targets: torch.Tensor, logps: torch.Tensor, lse: torch.Tensor,
               ent: Optional[torch.Tensor]) -> None:
    """Writes per-row ``z[target] - lse``, ``lse`` (and the entropies into ``ent`` when given)."""
    n, V = _rows(z, targets)
    if n:
        _logps_kernel[(n,)](z, z.stride(0), targets, logps, lse, lse if ent is None else ent, V,
                            BLOCK_V=_block(V), WANT_ENT=ent is not None)


def logps_grad_rows_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                     g_ent: Optional[torch.Tensor], ent: Optional[torch.Tensor], temperature: float) -> None:
    """``z`` (the chunk's logits / T) becomes the gradient of ``Σ g·logp + g_ent·H`` w.r.t. the raw logits."""
    n, V = _rows(z, targets)
    if n:
        has_ent = g_ent is not None
        _logps_grad_kernel[(n,)](z, z.stride(0), targets, lse, g, g_ent if has_ent else g, ent if has_ent else lse,
                                 V, 1.0 / temperature, BLOCK_V=_block(V), HAS_ENT=has_ent)
