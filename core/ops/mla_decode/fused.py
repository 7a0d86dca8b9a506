"""Front of the fused MLA decode op: input checks and backend dispatch (forward only)."""
from __future__ import annotations

import torch

import metareason.ops._dispatch as _dispatch
from metareason.ops.mla_decode.reference import BLOCK, default_scale, mla_decode_reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale):
    for name, t in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (call .contiguous())")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, but q is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, s_q, H, d_c + d_rope], got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: expected float32/bfloat16/float16, got {q.dtype}")
    B, sq, H, D = q.shape
    if kv_cache.dim() != 4 or kv_cache.shape[1] != BLOCK or kv_cache.shape[2] != 1 or kv_cache.shape[3] != D:
        raise ValueError(f"kv_cache: expected [num_blocks, {BLOCK}, 1, {D}], got {tuple(kv_cache.shape)}")
    if kv_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache: dtype {kv_cache.dtype} does not match q's {q.dtype}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table: expected int32 [{B}, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens: expected int32 [{B}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 1 <= head_dim_v <= D:
        raise ValueError(f"head_dim_v: expected an int in [1, {D}], got {head_dim_v!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a positive number or None, got {softmax_scale!r}")
    # capacity / bounds: one host sync, which is what makes bad tables an error, never a bad read
    capacity = block_table.shape[1] * BLOCK
    lens = cache_seqlens.cpu()
    if B and (int(lens.min()) < 0 or int(lens.max()) > capacity):
        raise ValueError(f"cache_seqlens: values must be in [0, {capacity}] (block_table holds "
                         f"{block_table.shape[1]} blocks of {BLOCK}), got {lens.tolist()}")
    if B and int(lens.max()) > 0:
        used = (lens.to(block_table.device).long() + BLOCK - 1) // BLOCK
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        ids = block_table[cols[None, :] < used[:, None]]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= kv_cache.shape[0]):
            raise ValueError(f"block_table: used entries must be in [0, {kv_cache.shape[0]}) (blocks in kv_cache)")


def _why_not(device: torch.device, explicit: str | None = None) -> dict[str, str | None]:
    return {
        "reference": None,
        "cpu": _dispatch.extension_why_not(device, "cpu", "mla_decode"),
        "cuda": _dispatch.extension_why_not(device, "cuda", "mla_decode_cuda"),
        "triton": _dispatch.triton_why_not(device, explicit),
    }


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    backend: str | None = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over the paged latent cache; see :mod:`metareason.ops.mla_decode.reference`.

    Returns ``(out [B, s_q, H, head_dim_v] in q's dtype, lse [B, H, s_q] fp32)``.
    ``num_splits`` (0 = auto) splits each sequence's keys across threads / CTAs.
    """
    _check(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale)
    scale = default_scale(q) if softmax_scale is None else float(softmax_scale)
    name = _dispatch.select("mla_decode", _why_not(q.device, backend), backend)
    if name == "reference" or q.numel() == 0:
        return mla_decode_reference(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal)
    if name == "triton":
        from metareason.ops.mla_decode.triton_kernel import mla_decode_triton

        return mla_decode_triton(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, num_splits)
    from metareason.ops._extension import extension

    ext = extension()
    fn = ext.mla_decode if name == "cpu" else ext.mla_decode_cuda
    out, lse = fn(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, bool(causal), int(num_splits))
    return out, lse
