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
