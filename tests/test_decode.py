"""The lean decode loop (metareason.generation.decode) equals the model's own ``generate`` token for token:
greedy, sampling under a fixed seed (temperature / top-k / top-p, and generate's default top-k),
left-padded prompts, shared-prompt groups, EOS and stop strings at different steps,
min_new_tokens, and log-probs equal to ``compute_transition_scores(normalize_logits=True)``.
Every comparison also compares the log-probs, so a change in logits processing or in the model
inputs (position ids, mask) is seen even where the sampled tokens happen to agree."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from metareason.generation.decode import StopStrings, decode, decoder_model, resolve
from metareason.generation.generate import encode_prompts, generate_batch
from metareason.models import build_char_tokenizer

PROMPTS = ["A=1;A=?", "B=A*22;C=B+1;C=?", "x", "Q=7;R=Q-3;S=R*2;S=?"]  # left padding, 4 lengths
SMALL = "ab;12="  # a tiny alphabet: EOS and the stop strings come up often


def tiny_llama(tok, seed=0, **arch):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **arch)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def char():
    tok = build_char_tokenizer()
    return tiny_llama(tok), tok


@pytest.fixture(scope="module")
def small():
    tok = build_char_tokenizer(SMALL)
    return tiny_llama(tok, seed=1), tok


class Spy:
    """Counts ``model.generate`` calls (the fallback) without changing what it does."""

    def __init__(self, model, monkeypatch):
        self.calls = 0
        original = model.generate

        def generate(*a, **k):
            self.calls += 1
            return original(*a, **k)

        monkeypatch.setattr(model, "generate", generate)


def both(model, tok, prompts, monkeypatch, seed=3, **kw):
    """``generate_batch`` through the lean loop (asserted: no ``generate`` call) and through ``generate``."""
    spy = Spy(model, monkeypatch)
    kw = dict(dict(max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0, stop=[], return_logprobs=True), **kw)
    torch.manual_seed(seed)
    lean = generate_batch(model, tok, prompts, decoder="lean", **kw)
    assert spy.calls == 0, "the lean loop fell back to generate"
    torch.manual_seed(seed)
    hf = generate_batch(model, tok, prompts, decoder="hf", **kw)
    assert spy.calls == 1
    return lean, hf


def assert_same(lean, hf):
    for a, b in zip(lean, hf, strict=True):
        assert (a.token_ids, a.text, a.stop_reason, a.num_tokens, a.trigger) == \
            (b.token_ids, b.text, b.stop_reason, b.num_tokens, b.trigger)
        if b.logprobs is not None:
            assert len(a.logprobs) == len(b.logprobs)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_greedy_equals_generate(char, monkeypatch):
    model, tok = char
    lean, hf = both(model, tok, PROMPTS, monkeypatch)
    assert_same(lean, hf)
    assert sum(g.num_tokens for g in lean) > 16


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (1.0, 1.0, 0),  # plain sampling (GRPO's)
    (0.7, 0.9, 0),  # temperature before top-p
    (1.4, 0.8, 20),  # temperature, top-k, top-p together
    (0.8, 1.0, 5),
    (1.0, 1.0, None),  # no top_k given: generate's default (50) applies, and must here too
])
def test_sampling_equals_generate_under_a_fixed_seed(char, monkeypatch, temperature, top_p, top_k):
    model, tok = char
    extra = {} if top_k is None else {"top_k": top_k}
    lean, hf = both(model, tok, PROMPTS * 2, monkeypatch, max_new_tokens=24, do_sample=True, temperature=temperature,
                    top_p=top_p, generate_kwargs=extra)
    assert_same(lean, hf)
    assert len({tuple(g.token_ids) for g in lean}) == len(lean)  # really sampled


def test_shared_prompt_groups_equal_generate(char, monkeypatch):
    model, tok = char
    rows = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[0]]  # groups of 3, 2, 1 and left padding
    lean, hf = both(model, tok, rows, monkeypatch, do_sample=True, share_prompts=True, generate_kwargs={"top_k": 0})
    assert_same(lean, hf)


def test_shared_prefill_runs_each_distinct_prompt_once(char):
    model, tok = char
    rows = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    enc = encode_prompts(tok, rows, torch.device("cpu"))
    shapes = []
    handle = model.model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                                   with_kwargs=True)
    try:
        s = resolve(model, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id)
        decode(model, enc["input_ids"], enc["attention_mask"], s, share_prompts=True)
    finally:
        handle.remove()
    width = enc["input_ids"].shape[1]
    # the two distinct prompts (all but their last token), then the last prompt token of every row
    assert shapes == [(2, width - 1), (5, 1), (5, 1), (5, 1)]


def test_eos_and_stop_strings_finish_rows_at_different_steps(small, monkeypatch):
    model, tok = small
    rows = ["ab", "a1=", "2", "b;a"] * 3
    lean, hf = both(model, tok, rows, monkeypatch, max_new_tokens=20, do_sample=True, stop=[";", "12"],
                    generate_kwargs={"top_k": 0}, seed=0)
    assert_same(lean, hf)
    reasons = {g.stop_reason for g in lean}
    assert {"eos", "stop"} <= reasons, reasons
    assert len({g.num_tokens for g in lean}) > 3  # finished at different steps


def test_triggers_are_stops_that_keep_their_text(small, monkeypatch):
    model, tok = small
    lean, hf = both(model, tok, ["ab", "a1=", "2", "b;a"] * 2, monkeypatch, max_new_tokens=20, do_sample=True,
                    stop=["12"], triggers=(";",), generate_kwargs={"top_k": 0}, seed=0)
    assert_same(lean, hf)
    assert any(g.stop_reason == "trigger" and g.text.endswith(";") for g in lean)


def test_the_loop_ends_when_every_row_has_finished(small):
    model, tok = small
    enc = encode_prompts(tok, ["ab", "a1=", "2", "b;a"], torch.device("cpu"))
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        s = resolve(model, max_new_tokens=200, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        out, _ = decode(model, enc["input_ids"], enc["attention_mask"], s,
                        stop=StopStrings(tok, [";"]))
    finally:
        handle.remove()
    assert out.shape[1] < 200 and len(calls) == out.shape[1]
    last = out[:, -1].tolist()
    assert any(t == tok.eos_token_id or tok.decode([t]) == ";" for t in last)  # the last row to finish did so now


def test_min_new_tokens_blocks_eos(small, monkeypatch):
    model, tok = small
    rows = ["ab", "a1=", "2", "b;a"] * 3
    lean, hf = both(model, tok, rows, monkeypatch, max_new_tokens=20, do_sample=True,
                    generate_kwargs={"top_k": 0, "min_new_tokens": 9, "suppress_tokens": [tok.pad_token_id]}, seed=0)
    assert_same(lean, hf)
    assert all(g.num_tokens >= 9 for g in lean) and any(g.stop_reason == "eos" for g in lean)


def test_grpo_sampling_settings_equal_generate(char, monkeypatch):
    """What the GRPO loop asks for: top_k 0, the pad token suppressed, min = max new tokens."""
    model, tok = char
    rows = [p for p in PROMPTS[:2] for _ in range(4)]
    lean, hf = both(model, tok, rows, monkeypatch, max_new_tokens=12, do_sample=True, share_prompts=True,
                    generate_kwargs={"top_k": 0, "min_new_tokens": 12,
                                                            "suppress_tokens": [tok.pad_token_id]})
    assert_same(lean, hf)
    assert all(g.num_tokens == 12 and tok.pad_token_id not in g.token_ids for g in lean)


def test_logprobs_equal_compute_transition_scores(char):
    model, tok = char
    enc = encode_prompts(tok, PROMPTS * 2, torch.device("cpu"))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, top_k=30,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(11)
    ids, logps = decode(model, enc["input_ids"], enc["attention_mask"], resolve(model, **kw), return_logprobs=True)
    torch.manual_seed(11)
    out = model.generate(**enc, **kw, return_dict_in_generate=True, output_scores=True)
    ref = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert torch.equal(ids, out.sequences[:, enc["input_ids"].shape[1]:])
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
                                     {"num_beams": 2}, {"renormalize_logits": True}])
def test_settings_the_loop_lacks_fall_back_to_generate(char, monkeypatch, setting):
    model, tok = char
    assert resolve(model, max_new_tokens=4, **setting) is None
    spy = Spy(model, monkeypatch)
    generate_batch(model, tok, PROMPTS, max_new_tokens=4, do_sample=False, temperature=1.0, top_p=1.0, stop=[],
                   generate_kwargs=setting)
    assert spy.calls == 1


def test_the_model_generation_config_is_honoured(char, monkeypatch):
    model, tok = char
    monkeypatch.setattr(model.generation_config, "top_k", 3)  # a saved model's own default
    assert resolve(model, max_new_tokens=4, do_sample=True).top_k == 3
    lean, hf = both(model, tok, PROMPTS, monkeypatch, do_sample=True)
    assert_same(lean, hf)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.2)
    assert resolve(model, max_new_tokens=4, do_sample=True) is None


def test_decoder_hf_forces_generate(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    from metareason import Kernel

    calls = []
    original = LlamaForCausalLM.generate

    def generate(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    texts = {}
    for decoder in ("lean", "hf"):
        k = Kernel({"plugins": [], "quiet": True, "model": {"path": str(tiny_model_dir)},
                    "generation": {"max_new_tokens": 6, "decoder": decoder}})
        texts[decoder] = [g.text for g in k.generate(PROMPTS)]
        assert len(calls) == (decoder == "hf")
    assert texts["lean"] == texts["hf"]
    with pytest.raises(ValueError, match="decoder"):
        generate_batch(None, None, [], max_new_tokens=1, do_sample=False, temperature=1.0, top_p=1.0, stop=[],
                       decoder="fast")


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
def test_deepseek_mla_equals_generate(monkeypatch, decode_cache):
    """The lru plugin's model: its own paged latent cache (swapped in on the prefill) or latents in a DynamicCache."""
    from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_latent_dim=16,
        q_latent_dim=24, rope_head_dim=8, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, decode_cache=decode_cache)).eval()
    assert decoder_model(model) is model
    rows = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    for share in (False, True):
        lean, hf = both(model, tok, rows, monkeypatch, max_new_tokens=10, do_sample=True, share_prompts=share,
                        stop=[";"], generate_kwargs={"top_k": 0})
        assert_same(lean, hf)


def test_lora_model_equals_generate(char, monkeypatch):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tok = char
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    peft_model.eval()
    assert decoder_model(peft_model) is peft_model.get_base_model()
    lean, hf = both(peft_model, tok, PROMPTS, monkeypatch, do_sample=True, generate_kwargs={"top_k": 0})
    assert_same(lean, hf)
    plain = generate_batch(model, tok, PROMPTS, max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0,
                           stop=[], return_logprobs=True)
    greedy = generate_batch(peft_model, tok, PROMPTS, max_new_tokens=16, do_sample=False, temperature=1.0,
                            top_p=1.0, stop=[], return_logprobs=True)
    assert [g.logprobs for g in plain] != [g.logprobs for g in greedy]  # the adapters are in the loop's forward


def test_absolute_position_model_equals_generate(monkeypatch):
    """GPT-2's learned absolute positions: unlike RoPE, a constant offset in the position ids
    changes its output, so this sees the prefill's position ids, not only their differences."""
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               initializer_range=0.3, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert decoder_model(model) is model
    for do_sample in (False, True):
        lean, hf = both(model, tok, PROMPTS, monkeypatch, do_sample=do_sample, generate_kwargs={"top_k": 0})
        assert_same(lean, hf)
