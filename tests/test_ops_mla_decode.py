"""mla_decode: fused backends vs the fp32 reference, the reference vs independent formulations
(naive decompress-then-attend, causal = shorter non-causal), dispatch errors, input checks."""
from __future__ import annotations

import pytest
import torch

from metareason import ops
from metareason.ops import BackendUnavailableError, mla_decode
from metareason.ops.mla_decode import absorb_queries, mla_decode_reference, mla_decompress_attention

EXT = ops.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="metareason._C is not built (METAREASON_NO_EXT=1 install)")
FUSED = [pytest.param("cpu", marks=needs_ext)]
if torch.cuda.is_available():  # CI runs on a CPU machine; the GPU session adds these
    FUSED.append(pytest.param("cuda", marks=pytest.mark.skipif(EXT is None or not EXT.has_cuda(), reason="no CUDA ext")))
    FUSED.append("triton")  # compiled Triton on the GPU; the CPU runs it interpreted in test_ops_triton.py

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def paged(seqlens, d_c, d_rope, *, H=4, s_q=1, dtype=torch.float32, device="cpu", spare=3, seed=0):
    """Random q and a paged cache whose block table is a random permutation of the blocks."""
    g = torch.Generator().manual_seed(seed)
    B, D = len(seqlens), d_c + d_rope
    max_blocks = max(1, max((s + 63) // 64 for s in seqlens))
    nb = B * max_blocks + spare
    cache = torch.randn(nb, 64, 1, D, generator=g).to(dtype)
    table = torch.randperm(nb, generator=g)[: B * max_blocks].view(B, max_blocks).int().contiguous()
    q = torch.randn(B, s_q, H, D, generator=g).to(dtype)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    return q.to(device), cache.to(device), table.to(device), lens.to(device)


def assert_lse_close(a, b, atol):
    both_inf = torch.isinf(a) & torch.isinf(b)
    torch.testing.assert_close(a[~both_inf], b[~both_inf], atol=atol, rtol=atol)
    assert torch.equal(torch.isinf(a), torch.isinf(b))


CASES = [  # (seqlens, d_c, d_rope, H)
    ([1, 64, 65, 200], 32, 16, 4),
    ([128, 1, 3], 48, 8, 2),
    ([64], 16, 0, 1),
    ([300, 577], 512, 64, 16),
    # the CPU kernel's tails: rows (5 or 10 = s_q*H, not a multiple of 4 / 16 lanes), channels
    # (100 = 64 + 2*16 + 4), keys (70, 130: partial 8-key tiles), more rows than lanes (H=20)
    ([70, 130], 100, 12, 5),
    ([65, 9], 520, 8, 20),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-dc{c[1]}-dr{c[2]}-H{c[3]}")
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, False), (2, True)])
def test_fused_matches_reference(backend, dtype, case, s_q, causal):
    seqlens, d_c, d_rope, H = case
    q, cache, table, lens = paged(seqlens, d_c, d_rope, H=H, s_q=s_q, dtype=dtype, device=device_of(backend))
    ref_out, ref_lse = mla_decode_reference(q, cache, table, lens, d_c, None, causal)
    out, lse = mla_decode(q, cache, table, lens, d_c, None, causal, backend=backend)
    assert out.shape == (len(seqlens), s_q, H, d_c) and out.dtype == dtype
    assert lse.shape == (len(seqlens), H, s_q) and lse.dtype == torch.float32
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    assert_lse_close(lse, ref_lse, 1e-4)


def device_of(backend):
    return "cuda" if backend in ("cuda", "triton") else "cpu"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("num_splits", [1, 2, 5, 0])
def test_splits_agree(backend, num_splits):
    q, cache, table, lens = paged([640, 129, 64], 64, 16, H=8, s_q=2, device=device_of(backend), seed=4)
    ref_out, ref_lse = mla_decode_reference(q, cache, table, lens, 64, 0.1, True)
    out, lse = mla_decode(q, cache, table, lens, 64, 0.1, True, backend=backend, num_splits=num_splits)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    assert_lse_close(lse, ref_lse, 1e-4)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_matches_naive_decompress(backend):
    """Absorbed queries over the latent cache == up-projecting the cache to per-head K/V."""
    g = torch.Generator().manual_seed(1)
    B, L, H, d_c, d_rope, d_nope, d_v = 2, 130, 4, 32, 8, 16, 12
    c_kv = torch.randn(B, L, d_c, generator=g)
    k_rope = torch.randn(B, L, d_rope, generator=g)
    W_uk, W_uv = torch.randn(H, d_c, d_nope, generator=g) / 4, torch.randn(H, d_c, d_v, generator=g) / 4
    q_nope, q_rope = torch.randn(B, H, d_nope, generator=g), torch.randn(B, H, d_rope, generator=g)
    scale = (d_nope + d_rope) ** -0.5
    want = mla_decompress_attention(q_nope, q_rope, c_kv, k_rope, W_uk, W_uv, scale)

    rows = torch.cat([c_kv, k_rope], dim=-1)  # [B, L, D] -> paged, blocks in reverse order
    nblk = (L + 63) // 64
    padded = torch.zeros(B, nblk * 64, d_c + d_rope)
    padded[:, :L] = rows
    cache = padded.view(B * nblk, 64, 1, -1).flip(0).contiguous()
    table = (B * nblk - 1 - torch.arange(B * nblk)).view(B, nblk).int()
    q = absorb_queries(q_nope, q_rope, W_uk)[:, None].contiguous()  # [B, 1, H, D]
    lat, _ = mla_decode(q, cache, table, torch.full((B,), L, dtype=torch.int32), d_c, scale, backend=backend)
    got = torch.einsum("bhc,hcv->bhv", lat[:, 0], W_uv)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_causal_is_shorter_noncausal(backend):
    """Query i of s_q sees exactly the first seqlen - s_q + i + 1 keys (FlashMLA semantics)."""
    q, cache, table, lens = paged([70, 130, 2], 24, 8, H=3, s_q=2, seed=7)
    out, lse = mla_decode(q, cache, table, lens, 24, None, True, backend=backend)
    for i in range(2):
        o_i, l_i = mla_decode(q[:, i : i + 1].contiguous(), cache, table, lens - 2 + i + 1, 24, None, False,
                              backend=backend)
        torch.testing.assert_close(out[:, i], o_i[:, 0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[:, :, i], l_i[:, :, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_empty_sequence(backend):
    q, cache, table, lens = paged([0, 5], 16, 0, H=2)
    out, lse = mla_decode(q, cache, table, lens, 16, backend=backend)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_default_scale_is_flashmla():
    q, cache, table, lens = paged([100], 32, 8)
    a, _ = mla_decode(q, cache, table, lens, 32)
    b, _ = mla_decode(q, cache, table, lens, 32, softmax_scale=(32 + 8) ** -0.5)
    torch.testing.assert_close(a, b)


def test_forced_backend_errors(monkeypatch):
    args = paged([10], 16, 0)
    monkeypatch.setenv("METAREASON_OPS", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        mla_decode(*args, 16)
    monkeypatch.setenv("METAREASON_OPS", "triton")
    with pytest.raises(BackendUnavailableError, match="triton"):
        mla_decode(*args, 16)
    with pytest.raises(ValueError, match="backend"):
        mla_decode(*args, 16, backend="tpu")
    monkeypatch.setenv("METAREASON_OPS", "reference")
    mla_decode(*args, 16)


def test_bad_inputs():
    q, cache, table, lens = paged([100, 20], 16, 8)
    base = dict(q=q, kv_cache=cache, block_table=table, cache_seqlens=lens, head_dim_v=16)
    bad_table = table.clone()
    bad_table[0, 1] = cache.shape[0]  # used block out of range
    unused_bad = table.clone()
    unused_bad[1, 1] = 10_000  # beyond seqlen 20 -> never read, allowed
    cases = [
        (dict(q=q.double()), "q"),
        (dict(q=q[:, :, :, :20]), "q"),  # non-contiguous slice
        (dict(q=q[0]), "q"),
        (dict(kv_cache=cache.half()), "kv_cache"),
        (dict(kv_cache=cache.view(-1, 32, 1, 24)), "kv_cache"),  # block size 32
        (dict(block_table=table.long()), "block_table"),
        (dict(block_table=bad_table), "block_table"),
        (dict(cache_seqlens=lens.long()), "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([129, 20], dtype=torch.int32)), "cache_seqlens"),  # > 2 blocks
        (dict(cache_seqlens=torch.tensor([-1, 20], dtype=torch.int32)), "cache_seqlens"),
        (dict(head_dim_v=25), "head_dim_v"),
        (dict(block_table=table.to("meta")), "block_table"),
    ]
    for backend in ["reference"] + (["cpu"] if EXT is not None else []):
        for override, name in cases:
            with pytest.raises(ValueError, match=name):
                mla_decode(**(base | override), backend=backend)
        mla_decode(**(base | dict(block_table=unused_bad)), backend=backend)
    if EXT is not None:  # the kernel's own checks, should the front be bypassed
        with pytest.raises(ValueError, match="cache_seqlens"):
            EXT.mla_decode(q, cache, table, torch.tensor([129, 20], dtype=torch.int32), 16, 1.0, False, 0)
        with pytest.raises(ValueError, match="block_table"):
            EXT.mla_decode(q, cache, bad_table, lens, 16, 1.0, False, 0)


@pytest.mark.skipif(EXT is None, reason="metareason._C is not built (METAREASON_NO_EXT=1 install)")
def test_default_dispatch_runs_the_compiled_cpu_kernel(monkeypatch):
    """Without METAREASON_OPS or backend=, CPU tensors go to the C++ kernel, not the reference."""
    monkeypatch.delenv("METAREASON_OPS", raising=False)
    calls = []
    real = EXT.mla_decode

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(EXT, "mla_decode", spy)
    q, cache, table, lens = paged([5, 70], 32, 16)
    mla_decode(q, cache, table, lens, 32)
    assert calls == [1]
