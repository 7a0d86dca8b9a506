"""metareason.generation.decode_step: a one-token step of a Llama-family model gives logits bit-identical to
the model's own forward (llama, qwen2 with q/k/v biases, qwen3 with q/k norms, mistral; grouped
and full key/value heads; float32 and bfloat16; left padding; LoRA), the lean loop really takes
it (and its tokens equal ``generate``'s, asserted in tests/test_decode.py for the default
decoder too), and a model whose forward it could not reproduce is refused."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from metareason.generation.decode import _cache_of, _reserve, decode, decoder_model, resolve
from metareason.generation.decode_step import DecodeStep
from metareason.generation.generate import encode_prompts, generate_batch
from metareason.models import build_char_tokenizer
from metareason.models.compat import CACHE_KWARG

PROMPTS = ["A=1;A=?", "B=A*22;C=B+1;C=?", "x", "Q=7;R=Q-3;S=R*2;S=?"]  # left padding, 4 lengths
FAMILIES = {
    "llama": {},
    "qwen2": {},  # q/k/v projections with bias
    "qwen3": {"head_dim": 8},  # RMSNorm on q and k per head
    "mistral": {"sliding_window": None},
}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok, model_type, seed=0, kv_heads=2, dtype=torch.float32, **arch):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                               max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **{**FAMILIES[model_type], **arch})
    model = AutoModelForCausalLM.from_config(cfg).eval().to(dtype)
    with torch.no_grad():  # biases and norm weights away from their init values, so skipping one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


class Counter:
    """Counts DecodeStep calls without changing them."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = DecodeStep.__call__

        def call(step, *a, **k):
            self.calls += 1
            return original(step, *a, **k)

        monkeypatch.setattr(DecodeStep, "__call__", call)


@torch.inference_mode()
def step_logits(model, tok, prompts, use_step: bool, steps: int = 3):
    """Prefill, then ``steps`` one-token steps through DecodeStep or the model: the logits of each."""
    enc = encode_prompts(tok, prompts, torch.device("cpu"))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B, P = ids.shape
    padded = not bool(mask.all())
    full = torch.ones((B, P + steps), dtype=mask.dtype)
    full[:, :P] = mask
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    cache = _cache_of(out)
    _reserve(cache, P + steps)
    step = DecodeStep.build(model)
    assert step is not None
    pos = pos[:, -1:]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    logits = []
    for t in range(steps):
        pos = pos + 1
        m = full[:, : P + t + 1] if padded else None
        if use_step:
            got = step(token, cache, pos, m)
        else:
            got = model(input_ids=token, position_ids=pos, attention_mask=m, use_cache=True, logits_to_keep=1,
                        **{CACHE_KWARG: cache}).logits
        logits.append(got)
        token = got[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits)


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_step_logits_bit_identical_to_the_model(tok, model_type, kv_heads):
    model = tiny(tok, model_type, kv_heads=kv_heads)
    for prompts in (PROMPTS, [PROMPTS[1]] * 3):  # padded and unpadded (no mask at all)
        ours, theirs = step_logits(model, tok, prompts, True), step_logits(model, tok, prompts, False)
        assert torch.equal(ours, theirs)


def test_bfloat16_bit_identical(tok):
    model = tiny(tok, "llama", dtype=torch.bfloat16)
    ours, theirs = step_logits(model, tok, PROMPTS, True), step_logits(model, tok, PROMPTS, False)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_lean_loop_takes_the_step_and_equals_generate(tok, model_type, monkeypatch):
    model = tiny(tok, model_type, seed=1)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, stop=[], return_logprobs=True,
              generate_kwargs={"top_k": 0})
    runs = {}
    for decoder in ("lean", "lean_model", "hf"):
        counter = Counter(monkeypatch)
        torch.manual_seed(5)
        runs[decoder] = generate_batch(model, tok, PROMPTS * 2, decoder=decoder, **kw)
        assert (counter.calls > 0) == (decoder == "lean"), decoder
    for a, b, c in zip(runs["lean"], runs["lean_model"], runs["hf"], strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.logprobs == b.logprobs  # the same floats, not merely close
        assert a.logprobs == pytest.approx(c.logprobs, abs=1e-5)


def test_lora_model_takes_the_step(tok, monkeypatch):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tiny(tok, "llama")),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.eval()
    base = decoder_model(peft_model)
    step = DecodeStep.build(base)
    assert step is not None and not isinstance(step.layers[0].q, torch.nn.Linear)  # the LoRA layer itself
    ours, theirs = step_logits(base, tok, PROMPTS, True), step_logits(base, tok, PROMPTS, False)
    assert torch.equal(ours, theirs)
    with peft_model.disable_adapter():  # the adapters matter: without them the logits differ
        assert not torch.equal(step_logits(base, tok, PROMPTS, True), ours)


def _eager(tok):
    model = tiny(tok, "llama")
    model.config._attn_implementation = "eager"
    return model


def _subclassed(tok):
    from transformers import LlamaForCausalLM

    class Custom(LlamaForCausalLM):
        pass

    model = tiny(tok, "llama")
    model.__class__ = Custom
    return model


def _hooked_layer(tok):
    model = tiny(tok, "llama")
    model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out * 0.5)
    return model


def _patched_forward(tok):
    model = tiny(tok, "llama")
    original = model.model.layers[0].forward
    model.model.layers[0].forward = lambda *a, **k: original(*a, **k)
    return model


def _sliding(tok):
    return tiny(tok, "mistral", sliding_window=4)


@pytest.mark.parametrize("make", [_eager, _subclassed, _hooked_layer, _patched_forward, _sliding])
def test_refuses_a_model_whose_forward_it_would_not_reproduce(tok, make):
    assert DecodeStep.build(make(tok)) is None


def test_a_hooked_model_still_decodes_as_generate(tok, monkeypatch):
    """The refusal is what keeps the hook: the lean loop then calls the model each step."""
    model = _hooked_layer(tok)
    counter = Counter(monkeypatch)
    kw = dict(max_new_tokens=10, do_sample=False, temperature=1.0, top_p=1.0, stop=[], return_logprobs=True)
    lean = generate_batch(model, tok, PROMPTS, decoder="lean", **kw)
    hf = generate_batch(model, tok, PROMPTS, decoder="hf", **kw)
    assert counter.calls == 0
    assert [g.token_ids for g in lean] == [g.token_ids for g in hf]


def test_unsupported_family_is_refused(tok):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4)
    assert DecodeStep.build(AutoModelForCausalLM.from_config(cfg)) is None


def test_decode_without_step_forward_never_calls_it(tok, monkeypatch):
    model = tiny(tok, "llama")
    counter = Counter(monkeypatch)
    enc = encode_prompts(tok, PROMPTS, torch.device("cpu"))
    sampling = resolve(model, max_new_tokens=5, do_sample=False, temperature=None, top_p=None, top_k=None)
    decode(model, enc["input_ids"], enc["attention_mask"], sampling, step_forward=False)
    assert counter.calls == 0
    decode(model, enc["input_ids"], enc["attention_mask"], sampling)
    assert counter.calls == 4  # steps 1..4 (step 0 is the prefill)
