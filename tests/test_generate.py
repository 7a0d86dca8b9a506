"""Generation: a deterministic bigram model (a Llama with no layers whose embeddings and output
head encode a successor table) makes stop strings, hand-over and log-probs checkable exactly."""
import pytest

from metareason import Kernel, hookimpl
from tests.conftest import save_bigram_llama

CHAIN = {"x": "1", "1": "2", "2": "3", "3": ";", ";": "4", "4": "5", "5": "</s>", "]": "9", "9": "</s>"}


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bigram")
    return save_bigram_llama(path, CHAIN)


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


def test_prompt_transform_applies_in_eval(tmp_path, tiny_model_dir):
    """``evaluate`` itself sends the transformed prompt to the model (eval_samples.jsonl shows it)."""
    import json

    from metareason.evaluate import evaluate

    class Prefix:
        @hookimpl
        def metareason_transform_prompt(self, prompt):
            return "Q:" + prompt

    k = Kernel({"plugins": [], "quiet": True, "model": {"path": str(tiny_model_dir)},
                "generation": {"max_new_tokens": 2},
                "data": {"eval": [{"task": "causal_loop", "num_samples": 2, "params": {"levels": [1]}}]}})
    k.register(Prefix(), name="prefix")
    model, tok = k.load()
    evaluate(k, model, tok, write_samples=tmp_path / "samples.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    originals = [k.build_task(spec)[i]["prompt"] for spec in k.config.data.eval for i in range(2)]
    assert [r["prompt"] for r in rows] == ["Q:" + p for p in originals]
