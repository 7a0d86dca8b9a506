"""Reference LRU/ACT recurrence: the readable spec the fused kernels are tested against.

For every token, with ``h_0 = x``, for n = 1..N (N = ``max_iterations``)::

    z, r = σ(W·h + U·x + b)                       # W, U: [2d, d]; z first
    h̃    = tanh(W_h·(r ⊙ h) + U_h·x + b_h)
    h_n  = (1 − z) ⊙ h + z ⊙ h̃
    p_n  = σ(w_p·h_n + b_p)

A token halts at the first n with Σ_{i≤n} p_i ≥ threshold, or at N. With R = 1 − Σ_{i<n} p_i
(the remainder) its output is Σ_{i<n} p_i h_i + R·h_n and its ponder cost n + R.
``fixed_iterations``: exactly N iterations for all tokens, output h_N, no halting; then
num_iterations = N and remainders = 0.

Outputs (``LRUActOutput``): ``out`` [..., d] in x's dtype; ``halt_probs`` [..., N] (p_i for
i ≤ n, zero after halting); ``num_iterations`` int64 [...]; ``remainders`` [...];
``residuals`` [..., N] = ||h_i − h_{i−1}|| for i ≤ n, zero after. The last three and
halt_probs are in the compute dtype (float64 for float64 x, else float32): every dtype is
computed in fp32 at least.

This reference is deliberately the plain masked loop: all tokens run all N iterations (a
halted token's state is frozen by masking, its GEMM rows still computed), so its cost is
N GEMM pairs whatever the halting mix. The fused backends only compute running tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from metareason.ops.lru_act.params import LRUParams


class LRUActOutput(NamedTuple):
    out: torch.Tensor
    halt_probs: torch.Tensor
    num_iterations: torch.Tensor
    remainders: torch.Tensor
    residuals: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lru_act_reference(
    x: torch.Tensor,
    params: LRUParams,
    max_iterations: int,
    halt_threshold: float,
    fixed_iterations: bool = False,
) -> LRUActOutput:
    d = x.shape[-1]
    lead = x.shape[:-1]
    ct = compute_dtype(x.dtype)
    xf = x.reshape(-1, d).to(ct)
    W, U, b, W_h, U_h, b_h, w_p, b_p = (t.to(ct) for t in params)
    N = xf.shape[0]

    gx = xf @ U.T + b  # x-parts of the gates, computed once
    hx = xf @ U_h.T + b_h
    h = xf
    running = torch.ones(N, dtype=torch.bool, device=x.device)
    cum = xf.new_zeros(N)
    out = xf.new_zeros(N, d)
    rem = xf.new_zeros(N)
    n_iter = torch.zeros(N, dtype=torch.long, device=x.device)
    probs, residuals = [], []
    for n in range(1, max_iterations + 1):
        z, r = torch.sigmoid(h @ W.T + gx).chunk(2, dim=-1)
        h_tilde = torch.tanh((r * h) @ W_h.T + hx)
        h_new = (1 - z) * h + z * h_tilde
        p = torch.sigmoid(h_new @ w_p + b_p)
        live = running.to(ct)
        probs.append(p * live)
        residuals.append(torch.linalg.vector_norm(h_new - h, dim=-1) * live)
        if fixed_iterations:
            h = h_new
            continue
        new_cum = cum + p
        stop = running & ((new_cum.detach() >= halt_threshold) | (n == max_iterations))
        R = 1 - cum
        weight = torch.where(stop, R, torch.where(running, p, torch.zeros_like(p)))
        out = out + weight[:, None] * h_new
        rem = torch.where(stop, R, rem)
        n_iter = torch.where(stop, torch.full_like(n_iter, n), n_iter)
        cum = torch.where(running, new_cum, cum)
        h = torch.where(running[:, None], h_new, h)  # a halted token's state stays frozen
        running = running & ~stop
    if fixed_iterations:
        out = h
        n_iter = torch.full_like(n_iter, max_iterations)
    return LRUActOutput(
        out.to(x.dtype).reshape(*lead, d),
        torch.stack(probs, dim=-1).reshape(*lead, max_iterations),
        n_iter.reshape(lead),
        rem.reshape(lead),
        torch.stack(residuals, dim=-1).reshape(*lead, max_iterations),
    )


def lru_act_eager_compact(
    x: torch.Tensor,
    params: LRUParams,
    max_iterations: int,
    halt_threshold: float,
) -> LRUActOutput:
    """The same recurrence in eager PyTorch, keeping only the running tokens each iteration.

    Halted rows are dropped from every tensor (boolean indexing), so the GEMM work is Σ_t n_t
    rows as in the fused backends. This is the fair eager baseline of ``bench kernels``: the
    masked reference above does N·max_iterations rows whatever the halting mix.
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    M = max_iterations
    ct = compute_dtype(x.dtype)
    xf = x.reshape(-1, d).to(ct)
    W, U, b, W_h, U_h, b_h, w_p, b_p = (t.to(ct) for t in params)
    N = xf.shape[0]
    gx, hx = xf @ U.T + b, xf @ U_h.T + b_h
    idx = torch.arange(N, device=x.device)
    h, cum, acc = xf, xf.new_zeros(N), xf.new_zeros(N, d)
    out, rem = xf.new_zeros(N, d), xf.new_zeros(N)
    probs, residuals = xf.new_zeros(N, M), xf.new_zeros(N, M)
    n_iter = torch.full((N,), M, dtype=torch.long, device=x.device)
    for n in range(1, M + 1):
        if idx.numel() == 0:
            break
        z, r = torch.sigmoid(h @ W.T + gx).chunk(2, dim=-1)
        h_new = (1 - z) * h + z * torch.tanh((r * h) @ W_h.T + hx)
        p = torch.sigmoid(h_new @ w_p + b_p)
        probs[idx, n - 1] = p
        residuals[idx, n - 1] = torch.linalg.vector_norm(h_new - h, dim=-1)
        new_cum = cum + p
        stop = (new_cum >= halt_threshold) | (n == M)
        R = 1 - cum
        done = idx[stop]
        out[done] = acc[stop] + R[stop, None] * h_new[stop]
        rem[done] = R[stop]
        n_iter[done] = n
        keep = ~stop
        acc = (acc + p[:, None] * h_new)[keep]
        cum, h, gx, hx, idx = new_cum[keep], h_new[keep], gx[keep], hx[keep], idx[keep]
    return LRUActOutput(out.to(x.dtype).reshape(*lead, d), probs.reshape(*lead, M), n_iter.reshape(lead),
                        rem.reshape(lead), residuals.reshape(*lead, M))
