"""Activation-lean Llama-family blocks (``train.lean_activations``).

Ops: :func:`metareason.ops.swiglu_down` and :func:`metareason.ops.rms_norm` give the reference's
values and gradients (fp32 to rounding, bf16 within its rounding) and save less for backward.
Patch (``metareason.train.lean_act``): a patched tiny Llama has the unpatched loss and every
parameter's gradient; autograd keeps at least 2 x intermediate per token per MLP and hidden per
token per norm fewer bytes (fails if the op kept ``silu(gate)`` or the product); LoRA-wrapped
projections are left alone; the SFT loop with the field on has the field-off loss curve.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metareason import Kernel
from metareason.config import ConfigError
from metareason.ops import BackendUnavailableError, rms_norm, swiglu_down
from metareason.ops.rms_norm import rms_norm_reference
from metareason.ops.swiglu_down import swiglu_down_reference
from metareason.train import lean_act
from metareason.train.sft import forward_batch
from tests.conftest import TINY_LLAMA

# (atol, rtol) against the reference: values / gradients
TOL = {torch.float32: ((1e-6, 1e-6), (1e-6, 1e-5)),
       torch.float64: ((1e-12, 1e-12), (1e-12, 1e-12)),
       torch.bfloat16: ((1e-2, 1e-2), (2e-2, 2e-2))}


def _leaf(shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()


def _run(fn, leaves, dy):
    for x in leaves:
        if x is not None:
            x.grad = None
    y = fn()
    y.backward(dy)
    return [y.detach()] + [None if x is None else x.grad.clone() for x in leaves]


# ------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,H", [((2, 5, 24), 16), ((7, 13), 9), ((1, 1, 3), 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_down_matches_reference(dtype, shape, H, bias):
    g = torch.Generator().manual_seed(0)
    gate, up = _leaf(shape, dtype, g), _leaf(shape, dtype, g)
    w, b = _leaf((H, shape[-1]), dtype, g, 0.3), _leaf((H,), dtype, g, 0.1) if bias else None
    dy = torch.randn(*shape[:-1], H, generator=g).to(dtype)
    leaves = [gate, up, w, b]
    got = _run(lambda: swiglu_down(gate, up, w, b), leaves, dy)
    ref = _run(lambda: swiglu_down_reference(gate, up, w, b), leaves, dy)
    (va, vr), (ga, gr) = TOL[dtype]
    torch.testing.assert_close(got[0], ref[0], atol=va, rtol=vr)
    for name, x, y in zip(("gate", "up", "weight", "bias"), got[1:], ref[1:]):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, atol=ga, rtol=gr, msg=name)


def test_swiglu_down_autocast_and_frozen_weight():
    """Under bf16 autocast the op computes what ``F.linear`` does there (fp32 weight cast); a
    frozen weight gets no gradient and the inputs still do."""
    g = torch.Generator().manual_seed(1)
    gate, up = _leaf((3, 4, 12), torch.bfloat16, g), _leaf((3, 4, 12), torch.bfloat16, g)
    w = _leaf((8, 12), torch.float32, g, 0.3)
    dy = torch.randn(3, 4, 8, generator=g).to(torch.bfloat16)
    outs = []
    for fn in (swiglu_down, swiglu_down_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_run(lambda: fn(gate, up, w), [gate, up, w], dy))
    for x, y in zip(*outs):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, atol=2e-2, rtol=2e-2)
    gate, up = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    w = w.detach()
    swiglu_down(gate, up, w).backward(dy.float())
    assert w.grad is None and gate.grad is not None and up.grad is not None


def test_swiglu_down_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    gate, up = _leaf((3, 5), torch.float64, g), _leaf((3, 5), torch.float64, g)
    w, b = _leaf((4, 5), torch.float64, g), _leaf((4,), torch.float64, g)
    assert torch.autograd.gradcheck(swiglu_down, (gate, up, w, b))


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(2, 5, 24), (7, 1), (3, 33)])
def test_rms_norm_matches_reference(x_dtype, w_dtype, shape):
    """The output is the reference's exactly (same ops, same order, same dtypes); gradients to
    rounding."""
    g = torch.Generator().manual_seed(3)
    x = _leaf(shape, x_dtype, g, 2.0)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype).requires_grad_()
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    dy = torch.randn(*shape, generator=g).to(out_dtype)
    got = _run(lambda: rms_norm(x, w, 1e-6), [x, w], dy)
    ref = _run(lambda: rms_norm_reference(x, w, 1e-6), [x, w], dy)
    assert got[0].dtype == out_dtype and torch.equal(got[0], ref[0])
    # the reference computes in fp32 whatever the input dtype (HF's upcast): fp64 gets fp32's tolerance
    _, (ga, gr) = TOL[torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype) else torch.float32]
    for name, a, b in zip(("x", "weight"), got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=ga, rtol=gr, msg=name)


def test_rms_norm_backward_formula_fp64():
    """The backward's closed form against autograd of the same math in fp64 (the op itself
    computes in fp32, as HF's upcast does, so gradcheck on it would measure fp32 rounding)."""
    from metareason.ops.rms_norm.fused import _RMSNorm

    g = torch.Generator().manual_seed(4)
    x, w = _leaf((3, 6), torch.float64, g), _leaf((6,), torch.float64, g)
    dy = torch.randn(3, 6, generator=g, dtype=torch.float64)
    ref = _run(lambda: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)), [x, w], dy)
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-5)

    class Ctx:
        saved_tensors = (x.detach(), rstd, w.detach())
        needs_input_grad = (True, True, False)

    with torch.autocast("cpu", enabled=False), torch.no_grad():
        gx, gw, _ = _RMSNorm.backward(Ctx, dy)
    torch.testing.assert_close(gx, ref[1], atol=1e-5, rtol=1e-5)  # h is upcast to fp32 inside
    torch.testing.assert_close(gw, ref[2], atol=1e-5, rtol=1e-5)


def test_input_checks_and_dispatch(monkeypatch):
    g = torch.Generator().manual_seed(5)
    gate, up, w = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(3, 6, generator=g)
    with pytest.raises(ValueError, match="gate and up"):
        swiglu_down(gate, up[:, :5], w)
    with pytest.raises(ValueError, match="down_weight"):
        swiglu_down(gate, up, w[:, :5])
    with pytest.raises(ValueError, match="down_bias"):
        swiglu_down(gate, up, w, torch.zeros(4))
    with pytest.raises(ValueError, match="down_weight: dtype"):
        swiglu_down(gate, up, w.double())
    with pytest.raises(ValueError, match="weight"):
        rms_norm(gate, torch.ones(5), 1e-6)
    with pytest.raises(BackendUnavailableError, match="swiglu_down"):
        swiglu_down(gate, up, w, backend="cuda")
    monkeypatch.setenv("METAREASON_OPS", "triton")
    with pytest.raises(BackendUnavailableError, match="rms_norm"):
        rms_norm(gate, torch.ones(6), 1e-6)


# ------------------------------------------------------------------------------- the patch
def llama(tie=False, bias=False, vocab=60):
    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=tie, mlp_bias=bias, **arch)).float()


def batch():
    from tests.test_packing import batch_of

    return batch_of()


def loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    _, loss, _, _ = forward_batch(model, b, b["labels"], torch.device("cpu"), 0, False)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_patched_llama_has_the_same_loss_and_gradients(tie, bias, monkeypatch):
    model, b = llama(tie, bias), batch()
    l0, g0 = loss_and_grads(model, b)
    keys = list(model.state_dict())
    on, line = lean_act.lean_activations_mode("auto", model)
    L = model.config.num_hidden_layers
    assert on and f"{L} MLPs through swiglu_down, {2 * L + 1} RMSNorms" in line
    calls = []
    op = sys.modules["metareason.ops.swiglu_down"]  # the package (metareason.ops.swiglu_down is the function)
    real = op.swiglu_down
    monkeypatch.setattr(op, "swiglu_down", lambda *a: calls.append(1) or real(*a))
    l1, g1 = loss_and_grads(model, b)
    assert len(calls) == L  # every MLP went through the op
    with torch.no_grad():  # generation / eval: the modules' own forward
        model(input_ids=b["input_ids"])
    assert len(calls) == L
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)
    lean_act.unpatch(model)
    assert not any(hasattr(m, lean_act.ORIGINAL) or "forward" in vars(m) for m in model.modules())


def test_a_hook_on_down_proj_still_sees_its_call():
    """A forward hook on down_proj (activation capture, a plugin's edit) runs with the patch on:
    that MLP runs its own forward, the same loss and gradients as unpatched with the hook."""
    model, b = llama(), batch()
    seen = []

    def hook(mod, args, out):
        seen.append(args[0].shape)
        return out * 0.5

    model.model.layers[1].mlp.down_proj.register_forward_hook(hook)
    l0, g0 = loss_and_grads(model, b)
    assert lean_act.lean_activations_mode(True, model)[0]
    l1, g1 = loss_and_grads(model, b)
    assert len(seen) == 2
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_families_patched_with_the_same_gradients(model_type):
    """Qwen2 (q/k/v biases), Qwen3 (q_norm / k_norm RMSNorms over [B, T, heads, head_dim]), Mistral."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model, b = AutoModelForCausalLM.from_config(cfg).float(), batch()
    l0, g0 = loss_and_grads(model, b)
    on, line = lean_act.lean_activations_mode(True, model)
    norms = 5 + (4 if model_type == "qwen3" else 0)
    assert on and f"2 MLPs through swiglu_down, {norms} RMSNorms" in line and "left" not in line
    l1, g1 = loss_and_grads(model, b)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_patched_llama_under_gradient_checkpointing(reentrant):
    """Checkpointed layers: the recompute runs the patched forward (reentrant: the first pass
    runs under no_grad, the module's own forward), same loss and gradients."""
    model, b = llama(), batch()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    l0, g0 = loss_and_grads(model, b)
    assert lean_act.lean_activations_mode(True, model)[0]
    l1, g1 = loss_and_grads(model, b)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_patched_llama_bf16_autocast_within_rounding():
    model, b = llama(), batch()
    out = []
    for patched in (False, True):
        if patched:
            assert lean_act.lean_activations_mode(True, model)[0]
        model.zero_grad(set_to_none=True)
        _, loss, _, _ = forward_batch(model, b, b["labels"], torch.device("cpu"), 0, False, "bf16")
        loss.backward()
        out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], atol=0, rtol=0)  # the forward is the same ops
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, atol=2e-3, rtol=5e-2, msg=name)


def saved_bytes(model, b) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one forward + loss."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss, _, _ = forward_batch(model, b, b["labels"], torch.device("cpu"), 0, False)
    loss.backward()
    return sum(storages.values())


def test_patch_saves_less_for_backward_by_at_least_the_expected_amount():
    """Per token: 2 x intermediate fewer floats per MLP (silu(gate) and the product), hidden
    fewer per RMSNorm (the normalised tensor). Fails if the op kept either of them."""
    model, b = llama(), batch()
    tokens = b["input_ids"].numel()
    cfg = model.config
    before = saved_bytes(model, b)
    assert lean_act.lean_activations_mode("auto", model)[0]
    after = saved_bytes(model, b)
    L = cfg.num_hidden_layers
    expected = 4 * tokens * (L * 2 * cfg.intermediate_size + (2 * L + 1) * cfg.hidden_size)
    assert before - after >= expected, (before, after, expected)


def test_lora_wrapped_mlps_are_left_and_gradients_still_equal():
    from tests.test_linear_ce import lora

    # LoRA on down_proj: an MLP patched anyway would read down_proj.weight and drop the adapter
    model, b = lora(llama(), ["q_proj", "v_proj", "down_proj"]), batch()
    l0, g0 = loss_and_grads(model, b)
    on, line = lean_act.lean_activations_mode("auto", model)
    L = model.config.num_hidden_layers
    assert on and f"0 MLPs through swiglu_down, {2 * L + 1} RMSNorms" in line
    assert f"{L} mlp: down_proj is a peft Linear, not a plain torch Linear" in line
    mlp = model.get_base_model().model.layers[0].mlp
    assert lean_act.ORIGINAL not in vars(mlp)
    l1, g1 = loss_and_grads(model, b)
    assert any("down_proj.lora_B" in k for k in g1) and g0.keys() == g1.keys()
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)

    partial = lora(llama(), ["q_proj", "v_proj"])  # frozen base MLPs: patched, LoRA grads equal
    l0, g0 = loss_and_grads(partial, b)
    on, line = lean_act.lean_activations_mode("auto", partial)
    assert on and f"{L} MLPs through swiglu_down" in line
    l1, g1 = loss_and_grads(partial, b)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_nothing_patchable_and_quantized_layers_left():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert lean_act.lean_activations_mode("auto", gpt2) == (
        False, "train.lean_activations=auto: off (no Llama-family MLP or RMSNorm modules)")
    with pytest.raises(ConfigError, match="train.lean_activations: true, but nothing in this model can be patched"):
        lean_act.lean_activations_mode(True, gpt2)
    model = llama()
    assert lean_act.lean_activations_mode(False, model) == (False, "train.lean_activations=false: off")
    assert not any(lean_act.ORIGINAL in vars(m) for m in model.modules())  # false patches nothing

    class Linear4bit(torch.nn.Linear):  # bitsandbytes' quantized layers subclass nn.Linear
        pass

    for layer in model.model.layers:
        old = layer.mlp.up_proj
        layer.mlp.up_proj = Linear4bit(old.in_features, old.out_features, bias=False)
    on, line = lean_act.lean_activations_mode("auto", model)
    assert on and "0 MLPs through swiglu_down, 5 RMSNorms" in line
    assert "2 mlp: up_proj is a test_lean_activations Linear4bit, not a plain torch Linear" in line
    lean_act.unpatch(model)
    assert not any(lean_act.ORIGINAL in vars(m) for m in model.modules())


def test_a_forced_backend_that_cannot_run_turns_it_off(monkeypatch):
    monkeypatch.setenv("METAREASON_OPS", "triton")
    on, line = lean_act.lean_activations_mode("auto", llama())
    assert not on and "swiglu_down has no Triton kernel" in line
    monkeypatch.setenv("METAREASON_OPS", "reference")
    with pytest.raises(ConfigError, match="METAREASON_OPS=reference"):
        lean_act.lean_activations_mode(True, llama())
    monkeypatch.setenv("METAREASON_OPS", "cpu")
    assert lean_act.lean_activations_mode(True, llama())[0]


def test_config_field():
    from metareason.config import load_config

    for value, want in (("auto", "auto"), ("true", True), (False, False)):
        cfg, _ = load_config(data={"plugins": [], "train": {"lean_activations": value}})
        assert cfg.train.lean_activations == want
    with pytest.raises(ConfigError, match="train.lean_activations") as err:
        load_config(data={"plugins": []}, overrides=["train.lean_activations=sometimes"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- the loop
def tiny_run(tmp_path, name, **train):
    from metareason.checkpoint import latest_checkpoint
    from tests.test_train import tiny, weights

    cfg = tiny(tmp_path, name, **dict({"max_steps": 3, "grad_accum": 1, "save_every": 0, "warmup_steps": 0},
                                      **train))
    cfg["eval"] = {"at_end": False}
    kernel = Kernel(cfg)
    kernel.run()
    run_dir = kernel.config.run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r], weights(latest_checkpoint(run_dir))


def test_sft_loop_with_the_field_on_has_the_field_off_loss_curve(tmp_path, capsys, monkeypatch):
    seen = []
    real = lean_act.lean_mlp
    monkeypatch.setattr(lean_act, "lean_mlp", lambda m, x: seen.append(1) or real(m, x))
    on, w_on = tiny_run(tmp_path, "on", lean_activations=True)
    err = capsys.readouterr().err
    assert "train.lean_activations=true: on (2 MLPs through swiglu_down, 5 RMSNorms" in err
    assert seen
    seen.clear()
    off, w_off = tiny_run(tmp_path, "off", lean_activations=False)
    assert "train.lean_activations=false: off" in capsys.readouterr().err and not seen
    assert len(on) == 3 and on == pytest.approx(off, rel=1e-6)
    assert w_on.keys() == w_off.keys()
    for k in w_off:
        torch.testing.assert_close(w_on[k], w_off[k], atol=1e-6, rtol=1e-5, msg=k)


def test_grpo_loop_with_the_field_on_has_the_field_off_metrics(tmp_path, capsys, monkeypatch):
    """Two GRPO steps (two rollouts: sampling runs the modules' own forward under no_grad, so the
    second rollout sees the same updated weights either way)."""
    from tests.test_grpo import kernel, rows, tiny

    seen = []
    real = lean_act.lean_norm
    monkeypatch.setattr(lean_act, "lean_norm", lambda m, x: seen.append(1) or real(m, x))
    out = {}
    for value in (True, False):
        k = kernel(tiny(tmp_path, f"g{value}", max_steps=2, lean_activations=value))
        k.run()
        out[value] = [r for r in rows(k.config.run_dir) if "train/loss" in r]
        assert bool(seen) == value
        seen.clear()
    assert "train.lean_activations=true: on (2 MLPs through swiglu_down" in capsys.readouterr().err
    assert len(out[True]) == 2
    for a, b in zip(out[True], out[False]):
        for key in ("train/loss", "rl/reward/mean", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_generation_still_takes_the_lean_decode_step(monkeypatch):
    """GRPO samples while the policy is patched: the patch is the modules' own forward without
    gradients, so DecodeStep still bypasses them and the tokens equal the unpatched model's; an
    instance forward that is not the patch still refuses it, and the patch leaves such a module."""
    from metareason.generation.decode_step import DecodeStep
    from metareason.generation.generate import generate_batch
    from metareason.models import build_char_tokenizer
    from tests.test_decode_step import Counter, tiny

    tok = build_char_tokenizer()
    model = tiny(tok, "llama")
    counter = Counter(monkeypatch)
    kw = dict(max_new_tokens=6, do_sample=False, temperature=1.0, top_p=1.0, stop=[], return_logprobs=True)
    before = generate_batch(model, tok, ["1+2=", "3*4="], decoder="lean", **kw)
    assert lean_act.lean_activations_mode(True, model)[0]
    counter.calls = 0
    after = generate_batch(model, tok, ["1+2=", "3*4="], decoder="lean", **kw)
    assert [g.token_ids for g in after] == [g.token_ids for g in before]
    assert [g.logprobs for g in after] == [g.logprobs for g in before]
    assert counter.calls > 0  # the patched model's generation went through DecodeStep
    assert DecodeStep.build(model) is not None
    lean_act.unpatch(model)
    mlp = model.model.layers[0].mlp
    own = mlp.forward
    mlp.forward = lambda x: own(x)  # someone else's instance forward (accelerate's offload hooks)
    assert DecodeStep.build(model) is None
    on, line = lean_act.lean_activations_mode("auto", model)
    assert "1 mlp: its forward is already replaced on the instance" in line and mlp.forward.__name__ == "<lambda>"
