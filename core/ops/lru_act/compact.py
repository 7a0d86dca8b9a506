"""Differentiable LRU/ACT recurrence with the halting steps given, on the compacted active set.

The fused forward kernels return no autograd graph; their backward re-runs the recurrence
here, with the halting steps the forward decided (``num_iterations``), and lets autograd
differentiate it. Halting decisions are therefore identical between forward and backward,
gradients flow into x, every parameter, halt_probs, remainders and residuals, and the cost
still follows Σ n_t because halted rows are dropped from every tensor (index_select), as in
the kernels.
"""
from __future__ import annotations

import torch

from metareason.ops.lru_act.params import LRUParams
from metareason.ops.lru_act.reference import compute_dtype


def lru_act_given_halting(
    x: torch.Tensor,
    params: LRUParams,
    num_iterations: torch.Tensor,
    max_iterations: int,
    fixed_iterations: bool,
):
    """x: [N, d]. Returns (out, halt_probs, remainders, residuals) in the compute dtype."""
    N, d = x.shape
    M = max_iterations
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    W, U, b, W_h, U_h, b_h, w_p, b_p = (t.to(ct) for t in params)
    gx = xc @ U.T + b
    hx = xc @ U_h.T + b_h
    nit = num_iterations.to(x.device)

    idx = torch.arange(N, device=x.device)
    h, gx_a, hx_a = xc, gx, hx
    cum = xc.new_zeros(N)
    acc = xc.new_zeros(N, d)
    hp_vals, hp_pos, res_vals = [], [], []
    out_vals, out_pos, rem_vals, rem_pos = [], [], [], []
    for n in range(1, M + 1):
        if idx.numel() == 0:
            break
        z, r = torch.sigmoid(h @ W.T + gx_a).chunk(2, dim=-1)
        h_new = h + z * (torch.tanh((r * h) @ W_h.T + hx_a) - h)
        p = torch.sigmoid(h_new @ w_p + b_p)
        hp_vals.append(p)
        hp_pos.append(idx * M + (n - 1))
        res_vals.append(torch.linalg.vector_norm(h_new - h, dim=-1))
        stop = nit[idx] == n
        keep = ~stop
        if fixed_iterations:
            out_vals.append(h_new[stop])
        else:
            R = 1 - cum
            out_vals.append(acc[stop] + R[stop, None] * h_new[stop])
            rem_vals.append(R[stop])
            rem_pos.append(idx[stop])
            acc = (acc + p[:, None] * h_new)[keep]
            cum = (cum + p)[keep]
        out_pos.append(idx[stop])
        h, gx_a, hx_a, idx = h_new[keep], gx_a[keep], hx_a[keep], idx[keep]

    flat = torch.cat(hp_pos)
    halt_probs = xc.new_zeros(N * M).index_put((flat,), torch.cat(hp_vals)).view(N, M)
    residuals = xc.new_zeros(N * M).index_put((flat,), torch.cat(res_vals)).view(N, M)
    out = xc.new_zeros(N, d).index_put((torch.cat(out_pos),), torch.cat(out_vals))
    if fixed_iterations:
        remainders = xc.new_zeros(N)
    else:
        remainders = xc.new_zeros(N).index_put((torch.cat(rem_pos),), torch.cat(rem_vals))
    return out, halt_probs, remainders, residuals
