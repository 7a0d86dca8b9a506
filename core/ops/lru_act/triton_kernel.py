"""Triton LRU/ACT forward on the compacted active set; same contract as the C++ forward.

Per iteration n, only the still-running tokens (``idx``, compacted on the host after each step)
go through three kernels:

1. gates: ``σ(h·Wᵀ + gx)`` tiled over (active rows, 2d) → ``z`` and ``r ⊙ h``;
2. candidate: ``tanh((r⊙h)·W_hᵀ + hx)``, ``h_n = h + z ⊙ (h̃ − h)``, plus the per-row partial sums of
   ``w_p·h_n`` and ``‖h_n − h‖²`` (atomic adds over the column tiles);
3. halting, one program per row tile: ``p_n``, the residual, the ACT sums, the output of the
   rows that stop, and the new running flags.

``gx = x·Uᵀ + b`` and ``hx = x·U_hᵀ + b_h`` are computed once by torch (one GEMM each). Returns
``(out, halt_probs, num_iterations, remainders, residuals, rows_processed)`` like
``metareason._C.lru_act_forward``; the backward is the shared one (ops/lru_act/fused.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gates_kernel(idx_ptr, A, h_ptr, W_ptr, gx_ptr, z_ptr, rh_ptr, d,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    am = pid_m * BM + tl.arange(0, BM)
    m_ok = am < A
    rows = tl.load(idx_ptr + am, mask=m_ok, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    n_ok = cols < 2 * d
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32 if h_ptr.dtype.element_ty != tl.float64 else tl.float64)
    for k0 in range(0, d, BK):
        k = k0 + ks
        k_ok = k < d
        a = tl.load(h_ptr + rows[:, None] * d + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W_ptr + cols[None, :] * d + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a, w, input_precision="ieee")
    ok = m_ok[:, None] & n_ok[None, :]
    g = acc + tl.load(gx_ptr + rows[:, None] * (2 * d) + cols[None, :], mask=ok, other=0.0)
    sig = 1.0 / (1.0 + tl.exp(-g))
    is_z = cols < d
    tl.store(z_ptr + rows[:, None] * d + cols[None, :], sig, mask=ok & is_z[None, :])
    hc = tl.where(is_z, 0, cols - d)
    h_r = tl.load(h_ptr + rows[:, None] * d + hc[None, :], mask=ok & ~is_z[None, :], other=0.0)
    tl.store(rh_ptr + rows[:, None] * d + hc[None, :], sig * h_r, mask=ok & ~is_z[None, :])


@triton.jit
def _candidate_kernel(idx_ptr, A, h_ptr, rh_ptr, Wh_ptr, hx_ptr, z_ptr, wp_ptr, hn_ptr, pdot_ptr, res2_ptr, d,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    am = pid_m * BM + tl.arange(0, BM)
    m_ok = am < A
    rows = tl.load(idx_ptr + am, mask=m_ok, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    n_ok = cols < d
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32 if h_ptr.dtype.element_ty != tl.float64 else tl.float64)
    for k0 in range(0, d, BK):
        k = k0 + ks
        k_ok = k < d
        a = tl.load(rh_ptr + rows[:, None] * d + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(Wh_ptr + cols[None, :] * d + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a, w, input_precision="ieee")
    ok = m_ok[:, None] & n_ok[None, :]
    off = rows[:, None] * d + cols[None, :]
    c = acc + tl.load(hx_ptr + off, mask=ok, other=0.0)
    cand = 2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0  # tanh
    h = tl.load(h_ptr + off, mask=ok, other=0.0)
    z = tl.load(z_ptr + off, mask=ok, other=0.0)
    hn = h + z * (cand - h)
    tl.store(hn_ptr + off, hn, mask=ok)
    wp = tl.load(wp_ptr + cols, mask=n_ok, other=0.0)
    diff = tl.where(ok, hn - h, 0.0)
    tl.atomic_add(pdot_ptr + rows, tl.sum(tl.where(ok, hn * wp[None, :], 0.0), axis=1), mask=m_ok)
    tl.atomic_add(res2_ptr + rows, tl.sum(diff * diff, axis=1), mask=m_ok)


@triton.jit
def _halting_kernel(idx_ptr, A, n, M, thr, b_p, pdot_ptr, res2_ptr, hn_ptr, h_ptr, acc_ptr, out_ptr, cum_ptr,
                    hp_ptr, res_ptr, nit_ptr, rem_ptr, run_ptr, d,
                    FIXED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    am = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = am < A
    rows = tl.load(idx_ptr + am, mask=m_ok, other=0).to(tl.int64)
    p = 1.0 / (1.0 + tl.exp(-(tl.load(pdot_ptr + rows, mask=m_ok, other=0.0) + b_p)))
    tl.store(hp_ptr + rows * M + (n - 1), p, mask=m_ok)
    tl.store(res_ptr + rows * M + (n - 1), tl.sqrt(tl.load(res2_ptr + rows, mask=m_ok, other=0.0)), mask=m_ok)
    cum = tl.load(cum_ptr + rows, mask=m_ok, other=0.0)
    last = n == M
    if FIXED:
        stop = m_ok & last
    else:
        stop = m_ok & ((cum + p >= thr) | last)
    rem = 1.0 - cum
    weight = tl.where(stop, rem, p)
    for c0 in range(0, d, BN):
        cols = c0 + tl.arange(0, BN)
        ok = m_ok[:, None] & (cols[None, :] < d)
        off = rows[:, None] * d + cols[None, :]
        hn = tl.load(hn_ptr + off, mask=ok, other=0.0)
        tl.store(h_ptr + off, hn, mask=ok)
        if FIXED:
            tl.store(out_ptr + off, hn, mask=ok & stop[:, None])
        else:
            a = tl.load(acc_ptr + off, mask=ok, other=0.0) + weight[:, None] * hn
            tl.store(out_ptr + off, a, mask=ok & stop[:, None])
            tl.store(acc_ptr + off, a, mask=ok & ~stop[:, None])
    if FIXED:
        tl.store(rem_ptr + rows, tl.zeros_like(cum), mask=stop)
    else:
        tl.store(rem_ptr + rows, rem, mask=stop)
        tl.store(cum_ptr + rows, cum + p, mask=m_ok & ~stop)
    tl.store(nit_ptr + rows, tl.zeros_like(rows) + n, mask=stop)
    tl.store(run_ptr + rows, (~stop).to(tl.int8), mask=m_ok)


def lru_act_forward_triton(x, W, U, b, W_h, U_h, b_h, w_p, b_p, max_iterations, halt_threshold, fixed_iterations):
    """All tensors contiguous, in one float dtype (fp32 or fp64), on one device (CUDA, or the CPU
    under TRITON_INTERPRET=1)."""
    N, d = x.shape
    M = int(max_iterations)
    gx = torch.addmm(b, x, U.T)  # [N, 2d], x-parts of the gates, once
    hx = torch.addmm(b_h, x, U_h.T)  # [N, d]
    h = x.clone()
    z, rh, hn = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    acc = torch.zeros_like(x)
    out = torch.zeros_like(x)
    cum, rem, pdot, res2 = (x.new_zeros(N) for _ in range(4))
    hp, res = x.new_zeros(N, M), x.new_zeros(N, M)
    nit = torch.zeros(N, dtype=torch.int64, device=x.device)
    running = torch.ones(N, dtype=torch.int8, device=x.device)
    idx = torch.arange(N, dtype=torch.int32, device=x.device)
    rows_processed = 0
    import os

    # the interpreter runs programs one by one: fewer, larger tiles are much faster there
    BM, BN, BK = (64, 64, 64) if os.environ.get("TRITON_INTERPRET", "0") == "1" else (32, 64, 32)
    for n in range(1, M + 1):
        A = idx.numel()
        if A == 0:
            break
        rows_processed += A
        pdot.zero_()
        res2.zero_()
        gm = triton.cdiv(A, BM)
        _gates_kernel[(gm, triton.cdiv(2 * d, BN))](idx, A, h, W, gx, z, rh, d, BM=BM, BN=BN, BK=BK)
        _candidate_kernel[(gm, triton.cdiv(d, BN))](idx, A, h, rh, W_h, hx, z, w_p, hn, pdot, res2, d,
                                                    BM=BM, BN=BN, BK=BK)
        _halting_kernel[(gm,)](idx, A, n, M, float(halt_threshold), float(b_p), pdot, res2, hn, h, acc, out, cum,
                               hp, res, nit, rem, running, d, FIXED=bool(fixed_iterations), BM=BM, BN=BN)
        idx = idx[running[idx.long()].bool()]  # compaction: halted tokens leave every later kernel
    return out, hp, nit, rem, res, torch.tensor(rows_processed, dtype=torch.int64)
