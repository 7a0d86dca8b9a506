"""Reference MLA decode attention (the spec) and the naive decompress-then-attend baseline.

``mla_decode_reference`` follows FlashMLA's ``flash_mla_with_kvcache`` shapes:

* ``q`` [B, s_q, H, D] with D = d_c + d_rope: queries after weight absorption (the nope part
  multiplied into the latent space by W_uk), concatenated with their RoPE part;
* ``kv_cache`` [num_blocks, 64, 1, D]: the paged latent cache, each row = [c_kv (d_c), k_rope];
* ``block_table`` int32 [B, max_blocks]: logical block j of sequence b lives at physical
  block ``block_table[b, j]``; ``cache_seqlens`` int32 [B];
* values are the first ``head_dim_v`` (= d_c) channels of the same rows.

``softmax_scale`` defaults to ``D ** -0.5`` like FlashMLA (real callers pass the scale of the
un-absorbed head, e.g. (d_nope + d_rope) ** -0.5, explicitly). With ``causal`` and s_q > 1,
query i sees key positions ``< seqlen - s_q + i + 1``. Returns ``out`` [B, s_q, H, head_dim_v]
in q's dtype and ``lse`` [B, H, s_q] fp32 (natural log); a query that sees no key gets
out = 0 and lse = -inf. Computed by gathering each sequence's rows in fp32 and a plain softmax.
"""
from __future__ import annotations

import torch

BLOCK = 64


def default_scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5


def mla_decode_reference(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None, causal=False):
    B, sq, H, D = q.shape
    scale = default_scale(q) if softmax_scale is None else float(softmax_scale)
    out = torch.zeros(B, sq, H, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, sq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        L = int(cache_seqlens[b])
        if L == 0:
            continue
        blocks = block_table[b, : (L + BLOCK - 1) // BLOCK].long()
        kv = kv_cache[blocks].reshape(-1, D)[:L].float()  # [L, D] gathered rows
        s = torch.einsum("qhd,td->hqt", q[b].float(), kv) * scale  # [H, s_q, L]
        if causal:
            visible = L - sq + torch.arange(sq, device=q.device) + 1  # keys per query
            masked = torch.arange(L, device=q.device)[None, :] >= visible[:, None]
            s = s.masked_fill(masked[None], float("-inf"))
        lse_b = torch.logsumexp(s, dim=-1)  # [H, s_q]
        p = torch.exp(s - lse_b[..., None]).nan_to_num(0.0)  # rows that see nothing -> 0
        out[b] = torch.einsum("hqt,tv->qhv", p, kv[:, :head_dim_v])
        lse[b] = lse_b
    return out.to(q.dtype), lse


def mla_decompress_attention(q_nope, q_rope, c_kv, k_rope, W_uk, W_uv, softmax_scale):
    """Naive MLA decode: up-project the latent cache to per-head K/V, then attend.

    q_nope [B, H, d_nope], q_rope [B, H, d_rope], c_kv [B, L, d_c], k_rope [B, L, d_rope],
    W_uk / W_uv [H, d_c, d_nope] / [H, d_c, d_v]. Returns [B, H, d_v] (no absorption): what the
    fused op avoids by attending in the latent space with absorbed queries.
    """
    k_nope = torch.einsum("blc,hcd->bhld", c_kv, W_uk)  # the per-step decompression
    v = torch.einsum("blc,hcd->bhld", c_kv, W_uv)
    s = torch.einsum("bhd,bhld->bhl", q_nope, k_nope) + torch.einsum("bhr,blr->bhl", q_rope, k_rope)
    p = torch.softmax(s * softmax_scale, dim=-1)
    return torch.einsum("bhl,bhld->bhd", p, v)


def absorb_queries(q_nope, q_rope, W_uk):
    """Absorbed query for the latent cache: [q_nope · W_ukᵀ, q_rope] -> [B, H, d_c + d_rope]."""
    return torch.cat([torch.einsum("bhd,hcd->bhc", q_nope, W_uk), q_rope], dim=-1)
