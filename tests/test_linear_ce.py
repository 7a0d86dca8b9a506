"""Fused linear cross-entropy (issue 35): the op against its unfused reference, and its use by
the SFT and GRPO loops against the unfused path.

Op (``metareason.ops.linear_ce``): loss / log-probs / entropies and the gradients of the hidden
states, the weight and the bias equal the reference's (fp32 tight, bf16 within bf16 rounding),
for chunk sizes that do not divide the token count, ignored and all-ignored targets, a
temperature, under autocast; no projection ever has more rows than one chunk.
Loops (``metareason.train.fused_ce``): the loss and every parameter's gradient equal the unfused
forward's for tied and untied output layers, a biased one, LoRA (also on the output layer, and a
``modules_to_save`` head) and packing; GRPO's log-probs (plain and shared-prompt forwards,
entropies) and their gradients too; one SFT step gives the same parameters fused or not;
``auto`` refuses models it cannot split and turns itself off when a hook reads the logits.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from metareason import Kernel, hookimpl
from metareason.config import ConfigError
from metareason.data.tokenize import IGNORE_INDEX
from metareason.ops import BackendUnavailableError
from metareason.ops.linear_ce import (linear_cross_entropy, linear_cross_entropy_reference, linear_token_logps,
                                      linear_token_logps_reference)
from metareason.ops.linear_ce import fused as fused_mod
from metareason.train import fused_ce
from metareason.train.sft import forward_batch
from tests.conftest import TINY_LLAMA

# (atol, rtol) of the fused op against the reference, per input dtype: values / gradients
TOL = {torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
       torch.float64: ((1e-10, 1e-10), (1e-10, 1e-10)),
       torch.bfloat16: ((1e-2, 1e-3), (1e-2, 2e-2))}


def inputs(N, H, V, dtype=torch.float32, bias=False, ignore=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore] = IGNORE_INDEX
    return h, w, b, t


def grads_of(fn, leaves):
    for x in leaves:
        if x is not None:
            x.grad = None
    out = fn()
    out.backward()
    return out.detach(), [None if x is None else x.grad.clone() for x in leaves]


def assert_grads_close(a, b, tol, names=("hidden", "weight", "bias")):
    for name, x, y in zip(names, a, b):
        if x is None:
            assert y is None, name
            continue
        torch.testing.assert_close(x.float(), y.float(), atol=tol[0], rtol=tol[1], msg=name)


# ------------------------------------------------------------------------------------------ op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,H,V,chunk,bias,ignore", [
    (37, 16, 50, 8, False, 0.3),    # chunks do not divide the tokens
    (64, 24, 97, 64, True, 0.0),    # one chunk, odd vocabulary, a bias
    (9, 8, 33, 1, True, 0.5),       # one row per chunk
    (40, 16, 31, 7, False, 1.0),    # every target ignored: loss 0, zero gradients
])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_reference(dtype, N, H, V, chunk, bias, ignore, reduction):
    h, w, b, t = inputs(N, H, V, dtype, bias, ignore)
    leaves = (h, w, b)
    ref, g_ref = grads_of(lambda: linear_cross_entropy_reference(h, w, t, b, reduction=reduction) * 0.7, leaves)
    got, g_got = grads_of(lambda: linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_tokens=chunk) * 0.7,
                          leaves)
    vtol, gtol = TOL[dtype]
    torch.testing.assert_close(got, ref.to(got.dtype), atol=vtol[0], rtol=vtol[1])
    assert_grads_close(g_got, g_ref, gtol)
    if ignore == 1.0:
        assert got.item() == 0.0 and all(g is None or not g.any() for g in g_got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logps_match_reference(dtype, temperature, entropy):
    h, w, b, t = inputs(29, 16, 45, dtype, bias=True)
    g = torch.Generator().manual_seed(3)
    up = torch.randn(29, generator=g)  # an arbitrary per-token upstream gradient
    up_ent = torch.randn(29, generator=g)

    def loss(fn, **kw):
        out = fn(h, w, t, b, temperature=temperature, return_entropy=entropy, **kw)
        if entropy:
            return (out[0] * up).sum() + (out[1] * up_ent).sum()
        return (out * up).sum()

    ref, g_ref = grads_of(lambda: loss(linear_token_logps_reference), (h, w, b))
    got, g_got = grads_of(lambda: loss(linear_token_logps, chunk_tokens=6), (h, w, b))
    vtol, gtol = TOL[dtype]
    torch.testing.assert_close(got, ref, atol=vtol[0], rtol=vtol[1])
    assert_grads_close(g_got, g_ref, gtol)
    with torch.no_grad():
        a = linear_token_logps(h, w, t, b, temperature=temperature, return_entropy=True, chunk_tokens=6)
        r = linear_token_logps_reference(h, w, t, b, temperature=temperature, return_entropy=True)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, atol=vtol[0], rtol=vtol[1])


def test_token_logps_gradcheck_fp64():
    h, w, b, t = inputs(7, 5, 11, torch.float64, bias=True)
    fn = lambda h, w, b: linear_token_logps(h, w, t, b, temperature=0.8, return_entropy=True, chunk_tokens=3)
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_no_gradient_work_without_grad_mode(monkeypatch):
    """Under no_grad (evaluation, reference log-probs) the loss computes no gradient buffers."""
    made = []
    real = fused_mod._grad_buffers
    monkeypatch.setattr(fused_mod, "_grad_buffers", lambda w, b, nw, nb: made.append((nw, nb)) or real(w, b, nw, nb))
    h, w, _, t = inputs(6, 4, 9)
    with torch.no_grad():
        a = linear_cross_entropy(h, w, t)
    assert made == [(False, False)]
    torch.testing.assert_close(a, linear_cross_entropy_reference(h, w, t))


def test_cross_entropy_backpropagates_once():
    """Its gradients are computed in forward and scaled in place: a second backward is an error,
    not a silently doubled scale."""
    h, w, _, t = inputs(6, 4, 9)
    loss = linear_cross_entropy(h, w, t) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_token_logps_shapes_and_frozen_weight():
    """[B, T, H] hidden states give [B, T] log-probs; a frozen weight gets no gradient work."""
    h, w, _, t = inputs(12, 8, 20)
    w.requires_grad_(False)
    out = linear_token_logps(h.view(3, 4, 8), w, t.view(3, 4), chunk_tokens=5)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    out.sum().backward()
    assert w.grad is None and h.grad is not None
    torch.testing.assert_close(out, linear_token_logps_reference(h.view(3, 4, 8), w, t.view(3, 4)))


def test_autocast_matches_the_unfused_autocast_path():
    """Under bf16 autocast the op sees what F.linear sees (bf16 inputs), fp32 master weights."""
    h, w, _, t = inputs(33, 16, 40, ignore=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, g_ref = grads_of(lambda: linear_cross_entropy_reference(h, w, t), (h, w))
        got, g_got = grads_of(lambda: linear_cross_entropy(h, w, t, chunk_tokens=5), (h, w))
    assert g_got[1].dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-3)
    assert_grads_close(g_got, g_ref, TOL[torch.bfloat16][1])
    # and not the fp32 result: the cast happened
    fp32 = linear_cross_entropy(h, w, t).detach()
    assert (got - fp32).abs().item() > 1e-6


def test_no_projection_has_more_rows_than_a_chunk(monkeypatch):
    """The [tokens, vocab] logits never exist: every projection (forward and backward) is one chunk."""
    rows = []
    real = F.linear

    def spy(x, w, b=None):
        rows.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(fused_mod.F, "linear", spy)
    h, w, _, t = inputs(50, 8, 30, ignore=0.2)
    linear_cross_entropy(h, w, t, chunk_tokens=8).backward()
    assert rows and max(rows) <= 8
    kept = int((t != IGNORE_INDEX).sum())
    assert sum(rows) == kept  # ignored targets get no logits, and nothing is recomputed
    rows.clear()
    linear_token_logps(h, w, t.clamp(min=0), chunk_tokens=8).sum().backward()
    assert max(rows) <= 8 and sum(rows) == 2 * 50  # forward + backward's recomputation


def test_default_chunk_bounds_the_chunk_logits():
    assert fused_mod.default_chunk(49152) * 49152 <= max(fused_mod.CHUNK_ELEMENTS, 128 * 49152)
    assert fused_mod.default_chunk(60) >= 1000


def test_dispatch_and_input_checks(monkeypatch):
    h, w, _, t = inputs(5, 4, 6)
    with pytest.raises(BackendUnavailableError, match="Triton kernels run on CUDA"):
        linear_cross_entropy(h, w, t, backend="triton")
    with pytest.raises(BackendUnavailableError, match="cuda backend needs CUDA"):
        linear_token_logps(h, w, t, backend="cuda")
    monkeypatch.setenv("METAREASON_OPS", "reference")
    called = []
    monkeypatch.setattr(fused_mod, "linear_cross_entropy_reference",
                        lambda *a, **k: called.append(1) or linear_cross_entropy_reference(*a, **k))
    linear_cross_entropy(h, w, t)
    assert called
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logps(h, w, t, temperature=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check.sh runs it)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    """On a GPU: the chunked torch path and the Triton epilogue, a real vocabulary, several chunks."""
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, b, t = (x if x is None else x.detach().cuda().requires_grad_(x.requires_grad)
                  for x in inputs(300, 64, 5000, dtype, bias=True, ignore=0.25))
    (vtol, gtol) = TOL[dtype]
    got, g_got = grads_of(lambda: linear_cross_entropy(h, w, t, b, chunk_tokens=128, backend=backend), (h, w, b))
    ref, g_ref = grads_of(lambda: linear_cross_entropy_reference(h, w, t, b), (h, w, b))
    torch.testing.assert_close(got, ref, atol=vtol[0], rtol=vtol[1])
    assert_grads_close(g_got, g_ref, gtol)
    tt = t.clamp(min=0)
    got, g_got = grads_of(lambda: linear_token_logps(h, w, tt, b, temperature=0.8, chunk_tokens=128,
                                                     backend=backend).sum(), (h, w, b))
    ref, g_ref = grads_of(lambda: linear_token_logps_reference(h, w, tt, b, 0.8).sum(), (h, w, b))
    torch.testing.assert_close(got, ref, atol=vtol[0] * 300, rtol=vtol[1])
    assert_grads_close(g_got, g_ref, gtol)


# ------------------------------------------------------------------------------- the SFT loop
def llama(tie=False, seed=0, vocab=60):
    torch.manual_seed(seed)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=tie, **arch)).float()


def lora(model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def lora_token_rows(tie):
    """LoRA plus trainable rows of three tokens (what SpecialToken(trainable=True) builds), the rows
    moved away from the base so that a fused path reading the base matrix would differ."""
    targets = {"embed_tokens": [3, 5, 7]} if tie else {"embed_tokens": [3, 5, 7], "lm_head": [3, 5, 7]}
    model = lora(llama(tie=tie), ["q_proj"], trainable_token_indices=targets)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def phi_with_bias():
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    return PhiForCausalLM(PhiConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128)).float()


MODELS = {
    "untied": lambda: llama(),
    "tied": lambda: llama(tie=True),
    "lora": lambda: lora(llama(), ["q_proj", "v_proj"]),
    "lora-on-head": lambda: lora(llama(), ["q_proj", "lm_head"]),
    "lora-head-saved": lambda: lora(llama(), ["q_proj"], modules_to_save=["lm_head"]),
    "lora-token-rows-tied": lambda: lora_token_rows(True),
    "lora-token-rows-untied": lambda: lora_token_rows(False),
    "biased-head": phi_with_bias,
}


def sft_batch():
    from tests.test_packing import batch_of

    return batch_of()


def sft_loss_and_grads(model, batch, packing, fused):
    model.zero_grad(set_to_none=True)
    outputs, loss, n, packed = forward_batch(model, batch, batch["labels"], torch.device("cpu"), 0, packing,
                                             fused=fused)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, packed, outputs, grads


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_and_gradients_fused_equal_unfused(kind, packing):
    model, batch = MODELS[kind](), sft_batch()
    assert fused_ce.fused_ce_mode("auto", model)[0]
    l0, n0, p0, _, g0 = sft_loss_and_grads(model, batch, packing, fused=False)
    l1, n1, p1, out, g1 = sft_loss_and_grads(model, batch, packing, fused=True)
    assert p0 == p1 == packing and n0 == n1
    assert not out.logits_read  # nothing read the logits: they were never computed
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and any("lora" in k for k in g0) == kind.startswith("lora")
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sft_bf16_autocast_fused_matches_unfused():
    """bf16 autocast: both paths compute the logits in bf16; loss within 1e-3 relative, gradients
    within bf16 rounding (atol 2e-3 on gradients of size ~1e-1)."""
    from metareason.data.packing import plan  # noqa: F401  (the padded path here)

    model, batch = llama(), sft_batch()
    out = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        _, loss, _, _ = forward_batch(model, batch, batch["labels"], torch.device("cpu"), 0, False, "bf16", fused)
        loss.backward()
        out[fused] = loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-3, rtol=1e-3)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, atol=2e-3, rtol=5e-2, msg=name)


def test_hooks_still_get_the_logits_with_their_gradient():
    """A hook reading ``outputs.logits`` gets the model's own logits (padded layout when packed),
    through the output layer, with gradient; until then the output layer never runs."""
    model, batch = llama(), sft_batch()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    for packing in (False, True):
        _, _, _, out, _ = sft_loss_and_grads(model, batch, packing, fused=True)
        assert not calls and not out.logits_read
        logits = out.logits
        assert logits.requires_grad and out.logits_read and len(calls) == 1
        with torch.no_grad():
            ref = model(input_ids=batch["input_ids"], use_cache=False).logits
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(logits[mask], ref[mask], atol=1e-5, rtol=1e-5)
        calls.clear()


def test_fused_ce_mode_refuses_what_it_cannot_split(monkeypatch):
    class Custom(LlamaForCausalLM):  # a model class of our own: its forward may attach outputs
        pass

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    on, line = fused_ce.fused_ce_mode("auto", Custom(LlamaConfig(vocab_size=60, **arch)))
    assert not on and "not one of transformers' model classes" in line
    capped = llama()
    capped.config.final_logit_softcapping = 30.0
    on, line = fused_ce.fused_ce_mode("auto", capped)
    assert not on and "final_logit_softcapping" in line
    with pytest.raises(ConfigError, match="train.fused_ce: true"):
        fused_ce.fused_ce_mode(True, capped)
    on, line = fused_ce.fused_ce_mode("auto", lora(llama(), ["lm_head"], ))
    assert on
    from peft import LoraConfig, get_peft_model

    dropped = get_peft_model(llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["lm_head"]))
    on, line = fused_ce.fused_ce_mode("auto", dropped)
    assert not on and "dropout" in line
    assert fused_ce.fused_ce_mode(False, llama()) == (False, "train.fused_ce=false: off")
    # the probe: a forward that changes the logits after the output layer is caught
    real = LlamaForCausalLM.forward

    def scaled(self, *a, **kw):
        out = real(self, *a, **kw)
        out.logits = out.logits * 1.01
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled)
    on, line = fused_ce.fused_ce_mode("auto", llama())
    assert not on and "differ from the model's" in line


# ------------------------------------------------------------------------------ the GRPO loop
def grpo_batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, 60, (3, 6), generator=g)
    pmask = torch.ones_like(prompts)
    prompts[1, :2], pmask[1, :2] = 0, 0  # left padding
    rows = torch.tensor([0, 0, 1, 1, 2])
    comp = torch.randint(4, 60, (len(rows), 5), generator=g)
    cmask = torch.ones_like(comp)
    comp[3, 2:], cmask[3, 2:] = 0, 0
    return torch.cat([prompts[rows], comp], 1), torch.cat([pmask[rows], cmask], 1), cmask


@pytest.mark.parametrize("kind", ["untied", "tied", "lora-on-head", "lora-token-rows-tied", "lora-token-rows-untied"])
@pytest.mark.parametrize("shared", [False, True])
def test_grpo_logps_entropies_and_gradients_fused_equal_unfused(kind, shared):
    from metareason.train.grpo_loss import completion_logps, shared_prompt_logps

    fn = shared_prompt_logps if shared else completion_logps
    model = MODELS[kind]()
    model.train()
    ids, attn, cmask = grpo_batch()
    weights = torch.arange(1, 6) * cmask

    def run(fused):
        model.zero_grad(set_to_none=True)
        lp, ent = fn(model, ids, attn, 5, temperature=0.8, return_entropy=True, fused=fused)
        ((lp * weights).sum() + (ent * weights.flip(1)).sum()).backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (a, ea, ga), (b, eb, gb) = run(False), run(True)
    m = cmask.bool()
    torch.testing.assert_close(b[m], a[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eb[m], ea[m], atol=1e-5, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-5, msg=name)
    if kind != "untied" and kind != "tied":  # the reference policy: adapters disabled, the head's too
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(fn(model, ids, attn, 5, fused=True)[m], fn(model, ids, attn, 5)[m],
                                       atol=1e-5, rtol=1e-5)
            base = fn(model, ids, attn, 5, fused=True)
        assert not torch.allclose(base[m], fn(model, ids, attn, 5, fused=True)[m])


# ------------------------------------------------------------------------------- whole runs
def tiny_run(tmp_path, name, plugin=None, **train):
    from tests.test_train import tiny

    cfg = tiny(tmp_path, name, **dict({"max_steps": 2, "grad_accum": 1, "save_every": 0, "warmup_steps": 0},
                                      **train))
    cfg["eval"] = {"at_end": False}
    kernel = Kernel(cfg)
    if plugin is not None:
        kernel.register(plugin, name="reader")
    kernel.run()
    run_dir = kernel.config.run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from metareason.checkpoint import latest_checkpoint
    from tests.test_train import weights

    ckpt = latest_checkpoint(run_dir)
    return [r for r in rows if "train/loss" in r], weights(ckpt), json.loads((ckpt / "trainer_state.json").read_text())


def test_an_sft_step_gives_the_same_parameters_fused_or_not(tmp_path, capsys):
    on, w_on, _ = tiny_run(tmp_path, "on", fused_ce=True)
    assert "train.fused_ce=true: on" in capsys.readouterr().err
    off, w_off, _ = tiny_run(tmp_path, "off", fused_ce=False)
    assert [r["train/loss"] for r in on] == pytest.approx([r["train/loss"] for r in off], rel=1e-6)
    for k in w_off:
        torch.testing.assert_close(w_on[k], w_off[k], atol=1e-6, rtol=1e-5, msg=k)
    assert any(not torch.equal(w_on[k], w_off[k]) for k in w_off)  # different arithmetic, really ran


def test_auto_turns_itself_off_once_a_hook_reads_the_logits(tmp_path, capsys):
    from metareason.train.sft import token_loss

    class Reader:
        @hookimpl
        def metareason_extra_losses(self, batch, outputs):
            return {"again": (0.5, token_loss(outputs.logits, batch["labels"])[0])}

    rows, _, state = tiny_run(tmp_path, "auto", Reader())
    err = capsys.readouterr().err
    assert "train.fused_ce=auto: on" in err and "train.fused_ce=auto: off from here on (step 1)" in err
    assert state[fused_ce.STATE_KEY] == 0
    off, _, _ = tiny_run(tmp_path, "off", Reader(), fused_ce=False)
    for key in ("train/loss", "train/again"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in off], rel=1e-5), key


def test_a_grpo_run_uses_the_fused_log_probs(tmp_path, capsys, monkeypatch):
    import metareason.train.grpo_loss as gl
    from tests.test_grpo import kernel, tiny

    seen = []
    real = gl._forward_and_logps
    monkeypatch.setattr(gl, "_forward_and_logps", lambda model, fused: seen.append(fused) or real(model, fused))
    kernel(tiny(tmp_path, max_steps=1, rl={"beta": 0.1, "num_iterations": 2})).run()
    assert "train.fused_ce=auto: on" in capsys.readouterr().err
    assert seen and all(seen)


def test_a_resumed_run_keeps_auto_off(tmp_path, monkeypatch, capsys):
    """Once ``auto`` turned the fusion off, the checkpoint says so and a resumed run starts off
    (its first step computes what the uninterrupted run computed)."""
    import metareason.train.sft as sft
    from metareason.train.sft import token_loss
    from tests.test_train import tiny

    class Reader:
        @hookimpl
        def metareason_extra_losses(self, batch, outputs):
            return {"again": (0.5, token_loss(outputs.logits, batch["labels"])[0])}

    def kernel(steps):
        cfg = tiny(tmp_path, "resume", max_steps=steps, grad_accum=1, save_every=0, warmup_steps=0)
        k = Kernel(dict(cfg, eval={"at_end": False}))
        k.register(Reader(), name="reader")
        return k

    kernel(1).run()
    seen = []
    real = sft.forward_batch
    monkeypatch.setattr(sft, "forward_batch", lambda *a: seen.append(a[-1]) or real(*a))
    capsys.readouterr()
    kernel(2).run(resume=True)
    assert seen == [False]
    assert "off from here on" not in capsys.readouterr().err
