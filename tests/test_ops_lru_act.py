"""lru_act: fused backends vs the reference, the reference vs a per-token loop, halting edge
cases, compaction, gradients (gradcheck fp64), dispatch errors and input checks."""
from __future__ import annotations

import math

import pytest
import torch

from metareason import ops
from metareason.ops import BackendUnavailableError, LRUParams, lru_act
from metareason.ops.lru_act import LRUActOutput, lru_act_eager_compact, lru_act_reference

EXT = ops.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="metareason._C is not built (METAREASON_NO_EXT=1 install)")
FUSED = [pytest.param("cpu", marks=needs_ext)]
if torch.cuda.is_available():  # CI runs on a CPU machine; the GPU session adds these
    FUSED.append(pytest.param("cuda", marks=pytest.mark.skipif(EXT is None or not EXT.has_cuda(), reason="no CUDA ext")))
    FUSED.append("triton")  # compiled Triton on the GPU; the CPU runs it interpreted in test_ops_triton.py

TOL = {  # (atol, rtol) for out; probs/residuals are fp32 for every low-precision dtype
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def device_of(backend):
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def make(n, d, *, halt_bias=0.0, gain=1.5, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    p = LRUParams.init(d, gain=gain, halt_bias=halt_bias, generator=g, dtype=torch.float64)
    # larger w_p spreads halting steps across tokens (a mix of 1..max steps)
    p = p._replace(w_p=p.w_p * 6)
    return x, p.to(dtype=dtype, device=device)


def clear_tokens(ref, threshold, margin):
    """Tokens whose running sums never come within ``margin`` of the threshold: on those the
    halting decision cannot flip between backends through rounding."""
    cum = ref.halt_probs.double().cumsum(-1)
    steps = torch.arange(cum.shape[-1], device=cum.device) < ref.num_iterations[..., None]
    gap = torch.where(steps, (cum - threshold).abs(), torch.full_like(cum, math.inf))
    return gap.amin(-1) > margin


def token_loop(x, p, max_iterations, threshold, fixed=False):
    """The definition, literally, one token at a time in float64 (independent of the reference)."""
    W, U, b, W_h, U_h, b_h, w_p, b_p = (t.double() for t in p)
    d = x.shape[-1]
    outs, nits, rems = [], [], []
    for xt in x.double():
        h, cum, out = xt.clone(), 0.0, torch.zeros(d, dtype=torch.float64)
        for n in range(1, max_iterations + 1):
            zr = torch.sigmoid(W @ h + U @ xt + b)
            z, r = zr[:d], zr[d:]
            h = (1 - z) * h + z * torch.tanh(W_h @ (r * h) + U_h @ xt + b_h)
            pn = float(torch.sigmoid(w_p @ h + b_p))
            if fixed:
                continue
            if cum + pn >= threshold or n == max_iterations:
                out = out + (1 - cum) * h
                nits.append(n)
                rems.append(1 - cum)
                break
            out, cum = out + pn * h, cum + pn
        outs.append(h if fixed else out)
        if fixed:
            nits.append(max_iterations)
            rems.append(0.0)
    return torch.stack(outs), torch.tensor(nits), torch.tensor(rems, dtype=torch.float64)


@pytest.mark.parametrize("fixed", [False, True])
def test_reference_matches_token_loop(fixed):
    x, p = make(9, 5, dtype=torch.float64, seed=3)
    ref = lru_act_reference(x, p, 6, 0.9, fixed)
    out, nit, rem = token_loop(x, p, 6, 0.9, fixed)
    assert torch.equal(ref.num_iterations, nit)
    torch.testing.assert_close(ref.out, out)
    torch.testing.assert_close(ref.remainders, rem)
    if not fixed:
        assert len(set(nit.tolist())) > 1, "the test data should give a mix of halting steps"


@pytest.mark.parametrize("halt_bias", [-0.5, 8.0, -8.0])
def test_eager_compact_matches_reference_on_fewer_rows(halt_bias, monkeypatch):
    """The benchmark's fair eager baseline: the same outputs, GEMMs on the running rows only."""
    x, p = make(40, 12, halt_bias=halt_bias, dtype=torch.float64, seed=5)
    ref = lru_act_reference(x, p, 6, 0.9)
    rows, mm = [], torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: rows.append(a.shape[0]) or mm(a, b))
    got = lru_act_eager_compact(x, p, 6, 0.9)
    monkeypatch.undo()
    for name in LRUActOutput._fields:
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), msg=name)
    # two input GEMMs of 40 rows, then per iteration three GEMMs on the tokens still running
    assert sum(rows) == 2 * 40 + 3 * int(ref.num_iterations.sum())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 8), (37, 16), (3, 50, 24), (300, 64)])
@pytest.mark.parametrize("fixed", [False, True])
def test_fused_matches_reference(backend, dtype, shape, fixed):
    *lead, d = shape
    n = math.prod(lead)
    x, p = make(n, d, halt_bias=-0.5, dtype=dtype, device=device_of(backend), seed=n + d)
    x = x.reshape(shape)
    ref = lru_act_reference(x, p, 6, 0.95, fixed)
    got = lru_act(x, p, 6, 0.95, fixed, backend=backend)
    assert got.out.shape == x.shape and got.out.dtype == dtype
    assert got.halt_probs.shape == (*lead, 6) and got.residuals.shape == (*lead, 6)
    ok = torch.ones(lead, dtype=torch.bool) if fixed else clear_tokens(ref, 0.95, 1e-3).cpu()
    assert ok.float().mean() > 0.8
    assert torch.equal(got.num_iterations.cpu()[ok], ref.num_iterations.cpu()[ok])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.out[ok].float(), ref.out[ok].float(), atol=atol, rtol=rtol)
    ptol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    for name in ("halt_probs", "remainders", "residuals"):
        torch.testing.assert_close(getattr(got, name)[ok], getattr(ref, name)[ok], **ptol, msg=name)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_all_halt_at_step_one(backend):
    x, p = make(50, 16, halt_bias=30.0, device=device_of(backend))
    r = lru_act(x, p, 8, 0.5, backend=backend)
    assert (r.num_iterations == 1).all()
    torch.testing.assert_close(r.remainders, torch.ones_like(r.remainders))  # R = 1 - (empty sum)
    h1 = lru_act(x, p, 1, 0.5, fixed_iterations=True, backend=backend).out  # out = R·h_1 = h_1
    torch.testing.assert_close(r.out, h1)
    assert (r.halt_probs[:, 1:] == 0).all() and (r.residuals[:, 1:] == 0).all()


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_none_halt_before_max(backend):
    x, p = make(40, 16, halt_bias=-30.0, device=device_of(backend))
    r = lru_act(x, p, 5, 0.99, backend=backend)
    assert (r.num_iterations == 5).all()
    hN = lru_act(x, p, 5, 0.99, fixed_iterations=True, backend=backend).out
    torch.testing.assert_close(r.out, hN, atol=1e-5, rtol=1e-4)  # p ≈ 0 so R ≈ 1, out ≈ h_N
    assert (r.residuals > 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_threshold_one(backend):
    x, p = make(200, 16, halt_bias=0.5, device=device_of(backend))
    ref = lru_act_reference(x, p, 8, 1.0)
    got = lru_act(x, p, 8, 1.0, backend=backend)
    ok = clear_tokens(ref, 1.0, 1e-4).cpu()
    assert torch.equal(got.num_iterations.cpu()[ok], ref.num_iterations.cpu()[ok])
    assert (ref.num_iterations > 1).all()  # a single p < 1 can never reach 1.0
    torch.testing.assert_close(got.out[ok], ref.out[ok], atol=2e-5, rtol=2e-4)


@needs_ext
def test_compaction_follows_ponder():
    """The CPU kernel's GEMMs run on exactly Σ_t n_t rows, not N · max_iterations."""
    x, p = make(512, 32, halt_bias=-0.5)
    out, hp, nit, rem, res, rows = EXT.lru_act_forward(x, *p[:7], float(p.b_p), 8, 0.9, False)
    assert int(rows) == int(nit.sum())
    assert int(rows) < 512 * 8 * 0.75, "test data should halt early on average"
    assert len(nit.unique()) >= 3
    *_, rows_fixed = EXT.lru_act_forward(x, *p[:7], float(p.b_p), 8, 0.9, True)
    assert int(rows_fixed) == 512 * 8


def _fn(backend, fixed, M=4, thr=0.8):
    def f(x, *params):
        r = lru_act(x, LRUParams(*params), M, thr, fixed, backend=backend)
        return r.out, r.halt_probs, r.remainders, r.residuals

    return f


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("fixed", [False, True])
def test_gradcheck_fp64(backend, fixed):
    x, p = make(6, 4, halt_bias=-0.5, gain=2.0, dtype=torch.float64, device=device_of(backend), seed=11)
    ref = lru_act_reference(x, p, 4, 0.8)
    assert clear_tokens(ref, 0.8, 1e-3).all(), "a perturbation must not flip a halting decision"
    inputs = (x.requires_grad_(), *(t.requires_grad_() for t in p))
    assert torch.autograd.gradcheck(_fn(backend, fixed), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_gradients_match_reference(backend):
    x, p = make(120, 24, halt_bias=-0.5, dtype=torch.float64, device=device_of(backend), seed=5)
    grads = []
    for be in ("reference", backend):
        inputs = (x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in p))
        r = lru_act(inputs[0], LRUParams(*inputs[1:]), 6, 0.9, backend=be)
        ponder = (r.num_iterations + r.remainders).sum()
        loss = (r.out ** 2).sum() + 0.1 * ponder + r.residuals.sum() + (r.halt_probs ** 2).sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads[0])


def test_forced_backend_errors(monkeypatch):
    x, p = make(4, 8)
    monkeypatch.setenv("METAREASON_OPS", "triton")
    with pytest.raises(BackendUnavailableError, match="triton"):
        lru_act(x, p, 3, 0.9)
    monkeypatch.setenv("METAREASON_OPS", "cuda")  # CPU tensors: never runnable on cuda
    with pytest.raises(BackendUnavailableError, match="METAREASON_OPS=cuda"):
        lru_act(x, p, 3, 0.9)
    monkeypatch.setenv("METAREASON_OPS", "gpu")
    with pytest.raises(ValueError, match="METAREASON_OPS"):
        lru_act(x, p, 3, 0.9)
    monkeypatch.setenv("METAREASON_OPS", "reference")
    lru_act(x, p, 3, 0.9)
    monkeypatch.setenv("METAREASON_OPS", "cpu")
    if EXT is None:
        with pytest.raises(BackendUnavailableError, match="not built"):
            lru_act(x, p, 3, 0.9)
    else:
        lru_act(x, p, 3, 0.9)


def test_bad_inputs():
    x, p = make(4, 8)
    cases = [
        (dict(x=x.long()), "x"),
        (dict(x=torch.randn(8, 4).t()), "x"),  # non-contiguous
        (dict(x=torch.randn(4, 6)), "params.W"),  # d mismatch
        (dict(params=p._replace(W_h=torch.randn(8, 9))), "params.W_h"),
        (dict(params=p._replace(b=p.b.to("meta"))), "params.b"),  # wrong device
        (dict(params=p._replace(U=torch.randn(8, 16).t())), "params.U"),
        (dict(params="nope"), "params"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(halt_threshold=float("nan")), "halt_threshold"),
    ]
    for override, name in cases:
        args = dict(x=x, params=p, max_iterations=3, halt_threshold=0.9) | override
        with pytest.raises(ValueError, match=name):
            lru_act(**args)


@needs_ext
def test_default_dispatch_runs_the_compiled_cpu_kernel(monkeypatch):
    """Without METAREASON_OPS or backend=, CPU tensors go to the C++ kernel, not the reference."""
    monkeypatch.delenv("METAREASON_OPS", raising=False)
    calls = []
    real = EXT.lru_act_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(EXT, "lru_act_forward", spy)
    x, p = make(10, 8)
    lru_act(x, p, 4, 0.9)
    assert calls == [1]
    monkeypatch.setenv("METAREASON_OPS", "reference")
    lru_act(x, p, 4, 0.9)
    assert calls == [1]  # forced to the reference: the kernel is not called
