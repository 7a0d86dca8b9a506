"""lru plugin, the model: the seed's API snippets, MLA (latent KV, decoupled RoPE, causality),
the LRU through the fused op (ACT and fixed mode), cached decoding == full recomputation,
save_pretrained / from_pretrained round trips (plain and through the kernel loader)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import metareason.plugins.lru.lru as lru_module
from metareason import Kernel
from metareason.checkpoint import write_weights
from metareason.errors import ModelLoadError
from metareason.models import build_char_tokenizer
from metareason.models.compat import CACHE_KWARG
from metareason.plugins.lru import (DeepSeekMLAConfig, DeepSeekMLAForCausalLM, LatentReasoningUnit, LRUConfig,
                                    MLAAttention, MLAConfig)
from metareason.plugins.lru.modeling import register

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_latent_dim=16,
            q_latent_dim=24, rope_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODES = {"act": dict(use_lru=True), "fixed": dict(use_lru=True, lru_fixed_iterations=True),
         "no_lru": dict(use_lru=False)}


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return DeepSeekMLAForCausalLM(DeepSeekMLAConfig(**dict(TINY, **kw))).eval()


# ------------------------------------------------------------------------- the seed's snippets
def test_seed_mla_snippet():
    config = MLAConfig(hidden_size=2048, num_attention_heads=16, kv_latent_dim=512, q_latent_dim=1536,
                       rope_head_dim=64)
    mla = MLAAttention(config, layer_idx=0)
    hidden_states = torch.randn(2, 6, 2048)
    position_ids = torch.arange(6)[None].expand(2, 6)
    output, attn_weights, past_kv = mla(hidden_states, position_ids=position_ids)
    assert output.shape == (2, 6, 2048) and attn_weights is None
    latent, k_rope = past_kv
    assert latent.shape == (2, 6, 512) and k_rope.shape == (2, 6, 64)  # the cache: latent + rope key only


def test_seed_lru_snippet():
    lru_config = LRUConfig(latent_dim=512, max_iterations=8, halt_threshold=0.99)
    lru = LatentReasoningUnit(lru_config)
    latent_kv = torch.randn(2, 5, 512)
    refined_latent, lru_output = lru(latent_kv)
    assert refined_latent.shape == latent_kv.shape
    assert lru_output.halt_probs.shape == (2, 5, 8)
    assert lru_output.ponder_cost.shape == (2, 5)
    assert lru_output.num_iterations.shape == (2, 5) and lru_output.num_iterations.dtype == torch.int64
    assert lru_output.residuals.shape == (2, 5, 8)


def test_seed_model_snippet():
    # As written (about 1.2B parameters): built on the meta device, no memory for weights.
    with torch.device("meta"):
        big = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=24,
                                                       use_lru=True, lru_max_iterations=8))
    assert len(big.model.layers) == 24
    assert all(layer.self_attn.lru is not None for layer in big.model.layers)
    assert big.model.layers[0].self_attn.lru.config.max_iterations == 8
    # The same call at a size that runs here.
    config = DeepSeekMLAConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               kv_latent_dim=32, q_latent_dim=48, rope_head_dim=16, use_lru=True, lru_max_iterations=8)
    model = DeepSeekMLAForCausalLM(config)
    input_ids = torch.randint(0, 320, (2, 9))
    outputs = model(input_ids, labels=input_ids)
    assert outputs.logits.shape == (2, 9, 320)
    assert torch.isfinite(outputs.loss) and outputs.loss.requires_grad
    assert set(outputs.aux_losses) == {"stability", "sparsity", "ponder"}


# ---------------------------------------------------------------------------------------- LRU
def test_lru_runs_through_the_fused_op(monkeypatch):
    calls = []
    real = lru_module.lru_act

    def spy(x, params, max_iterations, halt_threshold, fixed_iterations=False, **kw):
        calls.append((tuple(x.shape), max_iterations, halt_threshold, fixed_iterations))
        return real(x, params, max_iterations, halt_threshold, fixed_iterations, **kw)

    monkeypatch.setattr(lru_module, "lru_act", spy)
    model = tiny_model(lru_max_iterations=5, lru_halt_threshold=0.9)
    model(torch.randint(3, 40, (2, 7)))
    assert calls == [((2, 7, 16), 5, 0.9, False)] * 2  # one call per layer, on the KV latent [B,S,d_c]


def test_lru_act_and_fixed_outputs():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 16)
    act = LatentReasoningUnit(LRUConfig(latent_dim=16, max_iterations=6, halt_threshold=0.99))
    fixed = LatentReasoningUnit(LRUConfig(latent_dim=16, max_iterations=6, fixed_iterations=True))
    fixed.load_state_dict(act.state_dict())
    _, a = act(x)
    _, f = fixed(x)
    assert torch.equal(f.num_iterations, torch.full((3, 4), 6))
    assert torch.equal(f.remainders, torch.zeros(3, 4)) and torch.equal(f.ponder_cost, torch.full((3, 4), 6.0))
    assert (a.num_iterations < 6).any()  # p ~ 0.27 at init: ACT halts before N
    torch.testing.assert_close(a.ponder_cost, a.num_iterations.float() + a.remainders)
    # halting: the sum of p before the last step is below the threshold, the remainder completes it to 1
    steps = torch.arange(6)
    before = (a.halt_probs * (steps < (a.num_iterations - 1)[..., None])).sum(-1)
    torch.testing.assert_close(a.remainders, 1 - before)
    assert (a.residuals * (steps >= a.num_iterations[..., None])).abs().max() == 0  # zero after halting


def test_halting_bias_controls_iterations():
    x = torch.randn(2, 5, 16)
    early = LatentReasoningUnit(LRUConfig(latent_dim=16, max_iterations=8, halt_bias_init=8.0))
    late = LatentReasoningUnit(LRUConfig(latent_dim=16, max_iterations=8, halt_bias_init=-8.0))
    assert early(x)[1].num_iterations.max() == 1
    assert late(x)[1].num_iterations.min() == 8


def test_lru_changes_the_latent_and_gets_gradients():
    model = tiny_model()
    ids = torch.randint(3, 40, (2, 6))
    out = model(ids, labels=ids)
    out.loss.backward()
    lru = model.model.layers[0].self_attn.lru
    for name, p in lru.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32)
    c_kv = attn.kv_norm(attn.W_DKV(x))
    refined, _ = attn.latent(x)
    assert not torch.allclose(refined, c_kv)


# ---------------------------------------------------------------------------------------- MLA
def test_attention_is_causal():
    model = tiny_model()
    ids = torch.randint(3, 40, (1, 8))
    other = ids.clone()
    other[0, 5:] = (other[0, 5:] + 1) % 37 + 3
    a, b = model(ids).logits, model(other).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_decoupled_rope():
    torch.manual_seed(0)
    mla = MLAAttention(MLAConfig(hidden_size=32, num_attention_heads=4, kv_latent_dim=16, q_latent_dim=24,
                                 rope_head_dim=8))
    x = torch.randn(1, 6, 32)
    pos = torch.arange(6)[None]
    out, _, (latent, k_rope) = mla(x, position_ids=pos)
    shifted, _, (latent_s, k_rope_s) = mla(x, position_ids=pos + 11)
    torch.testing.assert_close(latent, latent_s)  # the cached latent carries no position
    assert not torch.allclose(k_rope, k_rope_s)  # the rope key does
    torch.testing.assert_close(out, shifted, atol=1e-5, rtol=1e-4)  # only relative positions matter
    spread, _, _ = mla(x, position_ids=pos * 3)
    assert not torch.allclose(out, spread, atol=1e-4)  # ... and they do matter


def test_absorbed_decoding_equals_expanded_attention():
    torch.manual_seed(0)
    mla = MLAAttention(MLAConfig(hidden_size=32, num_attention_heads=4, kv_latent_dim=16, q_latent_dim=None,
                                 rope_head_dim=8, use_lru=True))
    x = torch.randn(2, 7, 32)
    full, _, _ = mla(x)
    _, _, past = mla(x[:, :4])
    steps = []
    for t in range(4, 7):
        out, _, past = mla(x[:, t:t + 1], past_key_values=past)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-4)
    assert past[0].shape == (2, 7, 16)


# ------------------------------------------------------------------------------ cached decoding
def _count_kernel_calls(monkeypatch):
    """Spy on ``metareason.ops.mla_decode`` (the paged decode path imports it at call time)."""
    import metareason.ops as ops

    calls, original = [], ops.mla_decode

    def spy(q, kv_cache, block_table, cache_seqlens, *args, **kw):
        calls.append(cache_seqlens.tolist())
        return original(q, kv_cache, block_table, cache_seqlens, *args, **kw)

    monkeypatch.setattr(ops, "mla_decode", spy)
    return calls


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_cached_generation_equals_full_recomputation(mode, decode_cache, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    model = tiny_model(**MODES[mode], decode_cache=decode_cache)
    ids = torch.randint(3, 40, (3, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding, as in evaluation
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert len(out.logits) == 8
    if decode_cache == "paged":  # 7 decode steps x 2 layers through the kernel; padding never cached
        assert len(calls) == 7 * 2 and calls[0] == [5, 7, 7] and calls[-1] == [11, 13, 13]
        assert type(getattr(out, CACHE_KWARG)).__name__ == "PagedLatentCache"
    else:
        assert calls == []
    for t, step_logits in enumerate(out.logits):
        seq = out.sequences[:, :6 + t]
        m = torch.cat([mask, torch.ones(3, t, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            full = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
def test_cached_decoding_takes_the_absorbed_path(decode_cache, monkeypatch):
    """Decode steps score against the cached latents (the point of MLA): keys and values are
    decompressed only at the prefill; every later step runs the absorbed form (``_absorbed`` with
    the dynamic cache, ``_latent_decode`` -> ``mla_decode`` with the paged one)."""
    calls = {"expanded": [], "absorbed": [], "latent_decode": []}
    for name, key in (("_expanded", "expanded"), ("_absorbed", "absorbed"), ("_latent_decode", "latent_decode")):
        original = getattr(MLAAttention, name)

        def spy(self, q_nope, *args, _original=original, _key=key, **kw):
            calls[_key].append(q_nope.shape[2])  # query positions of this call
            return _original(self, q_nope, *args, **kw)

        monkeypatch.setattr(MLAAttention, name, spy)
    model = tiny_model(decode_cache=decode_cache)
    ids = torch.randint(3, 40, (2, 5))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   use_cache=True, pad_token_id=0, eos_token_id=None)
    layers = TINY["num_hidden_layers"]
    assert calls["expanded"] == [5] * layers  # the prefill only
    decoded = calls["absorbed"] if decode_cache == "dynamic" else calls["latent_decode"]
    assert decoded == [1] * (3 * layers)  # 3 one-token decode steps x layers, all in latent space
    assert calls["absorbed" if decode_cache == "paged" else "latent_decode"] == []


def test_decoding_runs_the_lru_on_new_tokens_only(monkeypatch):
    model = tiny_model()
    seen = []
    original = LatentReasoningUnit.forward

    def spy(self, latent):
        seen.append(latent.shape[1])
        return original(self, latent)

    monkeypatch.setattr(LatentReasoningUnit, "forward", spy)
    ids = torch.randint(3, 40, (2, 5))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   pad_token_id=0, eos_token_id=None)
    assert seen == [5, 5] + [1, 1] * 3  # prefill, then one new token per layer per step


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip(tmp_path, tied):
    register()
    model = tiny_model(tie_word_embeddings=tied, lru_fixed_iterations=False, lru_max_iterations=5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DeepSeekMLAForCausalLM
    assert loaded.config.lru_max_iterations == 5 and loaded.config.tie_word_embeddings == tied
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_kernel_loader_round_trip(tmp_path):
    arch = dict(TINY, model_type="deepseek_mla", lru_max_iterations=4)
    for key in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        arch.pop(key)  # the loader takes them from the tokenizer
    cfg = {"plugins": ["lru"], "output_dir": str(tmp_path), "quiet": True,
           "model": {"arch": arch, "tokenizer": {"type": "char"}}}
    kernel = Kernel(cfg)
    model, tok = kernel.load()
    assert type(model).__name__ == "DeepSeekMLAForCausalLM" and model.config.vocab_size == len(tok)
    write_weights(model, tok, tmp_path / "saved")
    again, tok2 = Kernel(dict(cfg, model={"path": str(tmp_path / "saved")})).load()
    ids = torch.tensor([tok("A=3;B=A+2;B=?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again.eval()(ids).logits)


def test_bad_arch_fields_name_the_field():
    with pytest.raises(ValueError, match="lru_max_iterations"):
        DeepSeekMLAConfig(**dict(TINY, lru_max_iterations=0))
    with pytest.raises(ValueError, match="lru_loss_weights.stabilty: unknown term"):
        DeepSeekMLAConfig(**dict(TINY, lru_loss_weights={"stabilty": 0.1}))
    with pytest.raises(ValueError, match="rope_head_dim: must be even"):
        DeepSeekMLAConfig(**dict(TINY, rope_head_dim=7))
    cfg = {"plugins": ["lru"], "quiet": True,
           "model": {"arch": {"model_type": "deepseek_mla", "hidden_size": 32, "num_attention_heads": 4,
                              "kv_latent_dim": 16, "lru_halt_threshold": 1.5}, "tokenizer": {"type": "char"}}}
    with pytest.raises(ModelLoadError, match="lru_halt_threshold"):
        Kernel(cfg).load()


def test_char_tokenizer_vocab_fits():
    tok = build_char_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    ids = torch.tensor([tok("A=1;A=?")["input_ids"]])
    assert model(ids).logits.shape[-1] == len(tok)


def test_gradient_checkpointing_gives_the_same_gradients():
    def run(checkpointing):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()  # includes the LRU terms, whose statistics leave the checkpointed layers
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
def test_cached_generation_with_lora_on_the_up_projections(decode_cache, monkeypatch):
    from peft import LoraConfig, get_peft_model

    calls = _count_kernel_calls(monkeypatch)
    model = get_peft_model(tiny_model(decode_cache=decode_cache), LoraConfig(r=4, target_modules=["W_UK", "W_UV", "W_DKV"],
                                                    init_lora_weights=False))  # random B: a real delta
    model.eval()
    ids = torch.randint(3, 40, (2, 5))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    for t, step_logits in enumerate(out.logits):
        with torch.no_grad():
            full = model(input_ids=out.sequences[:, :5 + t], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=2e-5, rtol=1e-5)
    assert len(calls) == (4 * 2 if decode_cache == "paged" else 0)


def _fresh_python(code: str, *args: str) -> str:
    """Run ``code`` in a new interpreter (no Kernel, no registration left over from this one)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_hugging_face_convention_loading_in_a_fresh_interpreter(tmp_path):
    """``import metareason.plugins.lru`` is all a user needs for the Auto classes (no Kernel)."""
    save = (
        "import sys, torch\n"
        "from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM\n"
        f"torch.manual_seed(0)\n"
        f"model = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(**{TINY!r})).eval()\n"
        "model.save_pretrained(sys.argv[1])\n"
        "ids = torch.arange(3, 12)[None]\n"
        "torch.save(model(ids).logits, sys.argv[1] + '/logits.pt')\n"
    )
    load = (
        "import sys, torch\n"
        "import metareason.plugins.lru\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.arange(3, 12)[None]\n"
        "expected = torch.load(sys.argv[1] + '/logits.pt', weights_only=True)\n"
        "print(type(config).__name__, type(model).__name__, bool(torch.equal(model(ids).logits, expected)))\n"
    )
    _fresh_python(save, str(tmp_path / "saved"))
    assert _fresh_python(load, str(tmp_path / "saved")).split() == [
        "DeepSeekMLAConfig", "DeepSeekMLAForCausalLM", "True"]


def test_plugin_discovery_does_not_import_torch():
    """The CLI loads every plugin's entry point on each call: that must stay cheap."""
    out = _fresh_python("import sys\nfrom metareason.plugin_manager import build_plugin_manager\n"
                        "build_plugin_manager()\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_left_padded_row_equals_the_same_row_unpadded(mode):
    """Padding keys are masked: real tokens of a left-padded row see exactly what they see unpadded."""
    model = tiny_model(**MODES[mode])
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    pad = 2
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(input_ids=padded, attention_mask=mask, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(left[:, pad:], plain, atol=2e-5, rtol=1e-5)


def test_paged_cache_across_block_boundaries_equals_recomputation():
    """Prompts of 60/63 real tokens: decoding crosses the 64-row page edge at different steps."""
    model = tiny_model()
    ids = torch.randint(3, 40, (2, 63))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    cache = getattr(out, CACHE_KWARG)
    assert cache.layers[0].lens == [64, 67] and [len(t) for t in cache.layers[0].tables] == [1, 2]
    assert cache.get_seq_length() == 67
    for t, step_logits in enumerate(out.logits):
        m = torch.cat([mask, torch.ones(2, t, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            full = model(input_ids=out.sequences[:, :63 + t], attention_mask=m, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=2e-5, rtol=1e-5)


def test_paged_cache_rejects_bad_config_and_padded_decode_tokens():
    with pytest.raises(ValueError, match="decode_cache: expected one of paged, dynamic"):
        DeepSeekMLAConfig(**dict(TINY, decode_cache="flash"))
    model = tiny_model()
    ids = torch.randint(3, 40, (1, 4))
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="new tokens after the prefill must all be real"):
            model(input_ids=ids[:, :1], attention_mask=torch.tensor([[1, 1, 1, 1, 0]]), past_key_values=past)
