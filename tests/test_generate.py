"""Generation: a deterministic bigram model (a Llama with no layers whose embeddings and output
head encode a successor table) makes stop strings, hand-over and log-probs checkable exactly."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from metareason import Kernel, hookimpl
from metareason.models import build_char_tokenizer

CHAIN = {"x": "1", "1": "2", "2": "3", "3": ";", ";": "4", "4": "5", "5": "</s>", "]": "9", "9": "</s>"}


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bigram")
    tok = build_char_tokenizer()
    v = len(tok)
    h = v + (v % 2)  # RoPE needs an even head size
    cfg = AutoConfig.for_model("llama", vocab_size=v, hidden_size=h, intermediate_size=8, num_hidden_layers=0,
                               num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.eye(v, h))
        head = torch.zeros(v, h)
        head[tok.pad_token_id, :] = 0.5  # anything not in CHAIN -> pad, at a lower logit
        for a, b in CHAIN.items():
            head[tok.convert_tokens_to_ids(b), tok.convert_tokens_to_ids(a)] = 20.0
        model.get_output_embeddings().weight.copy_(head)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def kernel_for(path, **gen):
    return Kernel({"plugins": [], "quiet": True, "model": {"path": str(path)},
                   "generation": dict({"max_new_tokens": 12, "batch_size": 4}, **gen)})


def test_greedy_eos_and_logprobs(bigram_dir):
    k = kernel_for(bigram_dir)
    (g,) = k.generate(["ax"], return_logprobs=True)
    assert g.text == "123;45" and g.stop_reason == "eos" and g.num_tokens == 6
    assert len(g.logprobs) == 6 and all(-1e-3 < lp <= 0 for lp in g.logprobs)


def test_stop_strings_cut_each_sequence(bigram_dir):
    k = kernel_for(bigram_dir, stop=[";"])
    gens = k.generate(["ax", "a2", "a9"])
    assert [g.text for g in gens] == ["123", "3", ""]
    assert [g.stop_reason for g in gens] == ["stop", "stop", "eos"]


def test_handover_at_trigger(bigram_dir):
    seen = []

    class Alter:
        @hookimpl
        def metareason_generation_triggers(self):
            return ["3"]

        @hookimpl
        def metareason_generation_handover(self, state):
            seen.append((state.text, state.trigger, state.round))
            return "[H]"

    k = kernel_for(bigram_dir)
    k.register(Alter(), name="alter")
    (g,) = k.generate(["ax"])
    # the model wrote "123", the alter wrote "[H]", the model resumed after "]" with "9" then EOS
    assert g.text == "123[H]9"
    assert seen == [("123", "3", 0)]
    assert g.handovers == [{"round": 0, "trigger": "3", "text": "[H]"}]
    assert g.num_tokens == 4  # model tokens only


def test_no_handover_lets_model_continue(bigram_dir):
    class Watcher:
        @hookimpl
        def metareason_generation_triggers(self):
            return ["3"]

    k = kernel_for(bigram_dir)
    k.register(Watcher(), name="watcher")
    (g,) = k.generate(["ax"])
    assert g.text == "123;45" and not g.handovers


def test_prompt_transform_applies_in_eval(tmp_path):
    from metareason.evaluate import build_eval_examples

    class Prefix:
        @hookimpl
        def metareason_transform_prompt(self, prompt):
            return "Q:" + prompt

    k = Kernel({"plugins": [], "data": {"eval": [{"task": "causal_loop", "num_samples": 2}]}})
    k.register(Prefix(), name="prefix")
    (_, ex), _ = build_eval_examples(k)
    out = k.chain("metareason_transform_prompt", "prompt", ex["prompt"], example=ex, config=k.config)
    assert out == "Q:" + ex["prompt"]
