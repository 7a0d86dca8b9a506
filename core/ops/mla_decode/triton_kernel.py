"""Triton MLA decode (flash-decoding over the paged latent cache); same contract as the C++ kernel.

One program per (sequence, split): all s_q·H query rows of the sequence (padded to ``BLOCK_R``)
against the split's 64-row cache blocks, scores and P·V through ``tl.dot`` (latent and RoPE
channels as two dots, so neither width needs to be a power of two), an online softmax in fp32,
and per-split (acc, max, sum) partials that :func:`mla_decode_triton` merges through their
log-sum-exp. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64


@triton.jit
def _mla_split_kernel(q_ptr, kv_ptr, table_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr,
                      R, H, SQ, DC, DR, DV, max_blocks, S, scale,
                      CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DC: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    D = DC + DR
    L = tl.load(lens_ptr + b)
    nblk = (L + BLOCK_T - 1) // BLOCK_T
    per = (nblk + S - 1) // S
    blk0 = s * per
    blk1 = tl.minimum(nblk, blk0 + per)

    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DC)
    rcols = tl.arange(0, BLOCK_DR)
    keys = tl.arange(0, BLOCK_T)
    row_ok = rows < R
    q_base = q_ptr + b * R * D
    q_c = tl.load(q_base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < DC),
                  other=0.0)
    if UPCAST:
        q_c = q_c.to(tl.float32)
    if HAS_ROPE:
        q_r = tl.load(q_base + rows[:, None] * D + DC + rcols[None, :],
                      mask=row_ok[:, None] & (rcols[None, :] < DR), other=0.0)
        if UPCAST:
            q_r = q_r.to(tl.float32)
    # query i (row r = i*H + h) sees key positions < L - SQ + i + 1
    visible = L - SQ + rows // H + 1

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
    for blk in range(blk0, blk1):
        phys = tl.load(table_ptr + b * max_blocks + blk).to(tl.int64)
        pos = blk * BLOCK_T + keys
        key_ok = pos < L
        base = kv_ptr + phys * BLOCK_T * D
        k_c = tl.load(base + keys[:, None] * D + cols[None, :], mask=key_ok[:, None] & (cols[None, :] < DC),
                      other=0.0)
        if UPCAST:
            k_c = k_c.to(tl.float32)
        # bf16/fp16 go to the tensor cores as they are (fp32 accumulation); fp32 stays exact (ieee)
        sc = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        if HAS_ROPE:
            k_r = tl.load(base + keys[:, None] * D + DC + rcols[None, :],
                          mask=key_ok[:, None] & (rcols[None, :] < DR), other=0.0)
            if UPCAST:
                k_r = k_r.to(tl.float32)
            sc += tl.dot(q_r, tl.trans(k_r), input_precision=PRECISION)
        sc = sc * scale
        ok = key_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (pos[None, :] < visible[:, None])
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_ref))
        p = tl.where(ok, tl.exp(sc - m_ref[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c, input_precision=PRECISION)  # values = the first DV (= latent) channels
        m_i = m_new

    item = b * S + s
    out_ok = row_ok[:, None] & (cols[None, :] < DV)
    tl.store(acc_ptr + (item * R + rows[:, None]) * DV + cols[None, :], acc, mask=out_ok)
    tl.store(m_ptr + item * R + rows, m_i, mask=row_ok)
    tl.store(l_ptr + item * R + rows, l_i, mask=row_ok)


def _interpreted() -> bool:
    """TRITON_INTERPRET=1 runs kernels in numpy, which has no bfloat16: loads are widened there."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def mla_decode_triton(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, num_splits=0):
    """Inputs already checked by the front. Returns ``(out [B,s_q,H,dv] q.dtype, lse [B,H,s_q] fp32)``."""
    B, sq, H, D = q.shape
    R = sq * H
    dc = head_dim_v
    if dc != D and dc > D:
        raise ValueError(f"head_dim_v: {dc} > {D}")
    dr = D - dc
    max_used = int(((cache_seqlens.max() + BLOCK - 1) // BLOCK).item()) if B else 0
    S = num_splits if num_splits > 0 else max(1, min(max(1, 128 // max(B, 1)), max(1, max_used // 4)))
    f32 = dict(dtype=torch.float32, device=q.device)
    acc = torch.zeros(B, S, R, dc, **f32)
    m = torch.full((B, S, R), float("-inf"), **f32)
    l = torch.zeros(B, S, R, **f32)
    if B and max_used:
        _mla_split_kernel[(B, S)](
            q, kv_cache, block_table, cache_seqlens, acc, m, l, R, H, sq, dc, dr, dc, block_table.shape[1], S,
            float(scale), CAUSAL=bool(causal), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=_interpreted() and q.dtype == torch.bfloat16, HAS_ROPE=dr > 0, BLOCK_R=_pow2(R), BLOCK_DC=_pow2(dc),
            BLOCK_DR=_pow2(max(dr, 1)), BLOCK_T=BLOCK, num_warps=8)
    # merge the splits through their log-sum-exp (out = 0, lse = -inf where nothing was visible)
    gm = m.max(dim=1).values  # [B, R]
    seen = gm > float("-inf")
    w = torch.where(m > float("-inf"), torch.exp(m - torch.where(seen, gm, 0.0)[:, None]), 0.0)
    tot = (w * l).sum(dim=1)
    out = (w[..., None] * acc).sum(dim=1) / torch.where(seen, tot, 1.0)[..., None]
    lse = torch.where(seen, torch.where(seen, gm, 0.0) + torch.log(torch.where(seen, tot, 1.0)), float("-inf"))
    out = torch.where(seen[..., None], out, 0.0)
    return out.view(B, sq, H, dc).to(q.dtype), lse.view(B, sq, H).transpose(1, 2).contiguous()
