"""Triton kernels on the CPU under TRITON_INTERPRET=1, against the references, over the shapes,
dtypes and edge cases of the C++ tests (tests/test_ops_mla_decode.py, tests/test_ops_lru_act.py).

Run by tests/test_ops_triton.py in a fresh interpreter with TRITON_INTERPRET=1: ``triton.jit``
(and triton's own library functions) choose the interpreter when triton is imported, which in
a whole-suite run may already have happened."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_ops_triton.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)
pytest.importorskip("triton")

from metareason.ops import BackendUnavailableError, mla_decode  # noqa: E402
from metareason.ops.mla_decode import mla_decode_reference  # noqa: E402
from test_ops_mla_decode import CASES, TOL, assert_lse_close, paged  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-dc{c[1]}-dr{c[2]}-H{c[3]}")
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, False), (2, True)])
def test_mla_triton_matches_reference(dtype, case, s_q, causal):
    seqlens, d_c, d_rope, H = case
    q, cache, table, lens = paged(seqlens, d_c, d_rope, H=H, s_q=s_q, dtype=dtype)
    out, lse = mla_decode(q, cache, table, lens, d_c, None, causal, backend="triton")
    ref, ref_lse = mla_decode_reference(q, cache, table, lens, d_c, None, causal)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    assert_lse_close(lse, ref_lse, 1e-4)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 0])
def test_mla_triton_splits_agree(num_splits):
    q, cache, table, lens = paged([640, 129, 64], 64, 16, H=8, s_q=2, seed=4)
    ref, ref_lse = mla_decode_reference(q, cache, table, lens, 64, 0.1, True)
    out, lse = mla_decode(q, cache, table, lens, 64, 0.1, True, backend="triton", num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert_lse_close(lse, ref_lse, 1e-4)


def test_mla_triton_empty_and_unseen_rows():
    """A sequence of length 0 -> out 0, lse -inf; causal with s_q > L leaves early queries blind."""
    q, cache, table, lens = paged([0, 2], 16, 8, H=2, s_q=3)
    out, lse = mla_decode(q, cache, table, lens, 16, None, True, backend="triton")
    ref, ref_lse = mla_decode_reference(q, cache, table, lens, 16, None, True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isinf(lse[0]).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert_lse_close(lse, ref_lse, 1e-4)


def test_triton_is_never_picked_on_the_cpu_unless_forced(monkeypatch):
    import importlib

    tk = importlib.import_module("metareason.ops.mla_decode.triton_kernel")

    calls = []
    monkeypatch.setattr(tk, "mla_decode_triton", lambda *a, **k: calls.append(1))
    q, cache, table, lens = paged([70], 16, 8)
    mla_decode(q, cache, table, lens, 16)  # default dispatch: cpu extension or reference
    assert calls == []
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="Triton kernels run on CUDA"):
        mla_decode(q, cache, table, lens, 16, backend="triton")


# ------------------------------------------------------------------------------------ lru_act
from test_ops_lru_act import TOL as LRU_TOL  # noqa: E402
from test_ops_lru_act import clear_tokens, make  # noqa: E402

from metareason.ops import lru_act  # noqa: E402
from metareason.ops.lru_act import lru_act_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 8), (37, 16), (3, 50, 24), (300, 64)])
@pytest.mark.parametrize("fixed", [False, True])
def test_lru_triton_matches_reference(dtype, shape, fixed):
    import math

    *lead, d = shape
    n = math.prod(lead)
    x, p = make(n, d, halt_bias=-0.5, dtype=dtype, seed=n + d)
    x = x.reshape(shape)
    ref = lru_act_reference(x, p, 6, 0.95, fixed)
    got = lru_act(x, p, 6, 0.95, fixed, backend="triton")
    assert got.out.shape == x.shape and got.out.dtype == dtype
    ok = torch.ones(lead, dtype=torch.bool) if fixed else clear_tokens(ref, 0.95, 1e-3)
    assert ok.float().mean() > 0.8
    assert torch.equal(got.num_iterations[ok], ref.num_iterations[ok])
    atol, rtol = LRU_TOL[dtype]
    torch.testing.assert_close(got.out[ok].float(), ref.out[ok].float(), atol=atol, rtol=rtol)
    ptol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    for name in ("halt_probs", "remainders", "residuals"):
        torch.testing.assert_close(getattr(got, name)[ok], getattr(ref, name)[ok], **ptol, msg=name)


def test_lru_triton_halting_edges():
    x, p = make(50, 16, halt_bias=30.0)
    r = lru_act(x, p, 8, 0.5, backend="triton")
    assert (r.num_iterations == 1).all() and (r.halt_probs[:, 1:] == 0).all()
    torch.testing.assert_close(r.remainders, torch.ones_like(r.remainders))
    x, p = make(40, 16, halt_bias=-30.0)
    r = lru_act(x, p, 5, 0.99, backend="triton")
    assert (r.num_iterations == 5).all() and (r.residuals > 0).all()


def test_lru_triton_compaction_follows_ponder():
    """The kernels run on exactly Σ_t n_t rows, not N · max_iterations."""
    from metareason.ops.lru_act.triton_kernel import lru_act_forward_triton

    x, p = make(512, 32, halt_bias=-0.5)
    out, hp, nit, rem, res, rows = lru_act_forward_triton(x, *p[:7], float(p.b_p), 8, 0.9, False)
    assert int(rows) == int(nit.sum()) and int(rows) < 512 * 8 * 0.75 and len(nit.unique()) >= 3
    *_, rows_fixed = lru_act_forward_triton(x, *p[:7], float(p.b_p), 8, 0.9, True)
    assert int(rows_fixed) == 512 * 8


def test_lru_triton_gradients_match_reference():
    x, p = make(30, 12, halt_bias=-0.5, dtype=torch.float64, seed=5)
    grads = []
    for be in ("reference", "triton"):
        inputs = (x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in p))
        r = lru_act(inputs[0], type(p)(*inputs[1:]), 6, 0.9, backend=be)
        loss = (r.out ** 2).sum() + 0.1 * (r.num_iterations + r.remainders).sum() + r.residuals.sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------- linear_ce
from metareason.ops import linear_cross_entropy, linear_token_logps  # noqa: E402
from metareason.ops.linear_ce import linear_cross_entropy_reference, linear_token_logps_reference  # noqa: E402

# (loss / log-probs / entropies, gradients) tolerances: the op's (docs/ops.md)
CE_TOL = {torch.float32: (dict(atol=1e-5, rtol=1e-5), dict(atol=1e-5, rtol=1e-5)),
          torch.bfloat16: (dict(atol=1e-2, rtol=1e-3), dict(atol=1e-2, rtol=2e-2)),
          torch.float64: (dict(atol=1e-10, rtol=1e-10), dict(atol=1e-10, rtol=1e-10))}


def _ce_inputs(N, H, V, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t


def _grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None])


# (input dtype, BLOCK_V cap): 16 makes every row several column blocks (the online softmax across
# blocks), in fp32 only (the interpreter is slow)
CE_CASES = [(torch.float32, 4096), (torch.float32, 16), (torch.bfloat16, 4096), (torch.float64, 4096)]
CE_IDS = ["fp32", "fp32-multi-block", "bf16", "fp64"]


def _cap_block(monkeypatch, block_v):
    from metareason.ops.linear_ce import triton_kernel

    monkeypatch.setattr(triton_kernel, "MAX_BLOCK_V", block_v)


@pytest.mark.parametrize("dtype,block_v", CE_CASES, ids=CE_IDS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_ce_triton_matches_reference(dtype, block_v, bias, monkeypatch):
    _cap_block(monkeypatch, block_v)
    h, w, b, t = _ce_inputs(37, 16, 100, dtype, bias)
    t[[3, 20]] = -100  # ignored rows
    loss = linear_cross_entropy(h, w, t, b, chunk_tokens=8, backend="triton")
    ref = linear_cross_entropy_reference(h, w, t, b)
    vtol, gtol = CE_TOL[dtype]
    torch.testing.assert_close(loss, ref, **vtol)
    for got, want in zip(_grads(loss, (h, w, b)), _grads(ref, (h, w, b))):
        torch.testing.assert_close(got.float(), want.float(), **gtol)


@pytest.mark.parametrize("dtype,block_v", CE_CASES, ids=CE_IDS)
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True), (1.3, False)])
def test_linear_token_logps_triton_matches_reference(dtype, block_v, temperature, entropy, monkeypatch):
    _cap_block(monkeypatch, block_v)
    h, w, b, t = _ce_inputs(29, 16, 77, dtype, True, seed=1)
    got = linear_token_logps(h, w, t, b, temperature=temperature, return_entropy=entropy, chunk_tokens=8,
                             backend="triton")
    ref = linear_token_logps_reference(h, w, t, b, temperature, entropy)
    got, ref = (got if entropy else (got,)), (ref if entropy else (ref,))
    vtol, gtol = CE_TOL[dtype]
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(29, generator=g, dtype=r.dtype) for r in ref]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **vtol)
    objective = [sum((x * c).sum() for x, c in zip(side, weights)) for side in (got, ref)]
    for a, r in zip(_grads(objective[0], (h, w, b)), _grads(objective[1], (h, w, b))):
        torch.testing.assert_close(a.float(), r.float(), **gtol)


def test_linear_ce_triton_only_when_forced(monkeypatch):
    from metareason.ops.linear_ce import triton_kernel

    calls = []
    original = triton_kernel.ce_rows_
    monkeypatch.setattr(triton_kernel, "ce_rows_", lambda *a, **k: calls.append(1) or original(*a, **k))
    h, w, b, t = _ce_inputs(9, 8, 20, torch.float32, False)
    linear_cross_entropy(h, w, t)  # default dispatch on the CPU: the chunked torch path
    assert calls == []
    linear_cross_entropy(h, w, t, backend="triton")
    assert calls  # the forced backend really runs the kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="Triton kernels run on CUDA"):
        linear_cross_entropy(h, w, t, backend="triton")
