"""The control reward's parts (registered separately so the RL loop logs each) and the
overthinking causal-loop task variant the demonstration trains its target on."""
import pytest

from metareason import Kernel
from metareason.config import ConfigError
from metareason.data.causal_loop import parse_answer


@pytest.fixture(scope="module")
def kernel():
    return Kernel({"plugins": ["cspo"]})


def test_rewards_are_registered_by_the_plugin(kernel):
    for name in ("cspo_correct", "cspo_structure", "cspo_length"):
        assert kernel.rewards.owner(name) == "cspo"


def test_correctness_reads_the_answer_outside_control_segments(kernel):
    fn = kernel.rewards.get("cspo_correct")
    ex = [{"answer": "9"}] * 4
    texts = ["B=1;wait<control>conclude</control>answer:9",
             "B=1;<control>answer:9</control>answer:8",  # an answer inside a segment does not count
             "B=1;answer:7", "no answer"]
    assert fn(texts, ex) == [1.0, 0.0, 0.0, 0.0]
    assert fn(["so the answer: 3.5"], [{"answer": "3.5"}]) == [1.0]  # non-integer answers, jsonl rules


def test_structure_scores(kernel):
    fn = kernel.rewards.get("cspo_structure")
    texts = ["a<control>conclude</control>b", "plain text", "a<control>conclude", "a</control>b<control>x</control>",
             "<control><control>x</control>", "<control> </control>"]
    assert fn(texts, [{}] * len(texts)) == [1.0, 0.0, -1.0, -1.0, -1.0, -1.0]


def test_length_penalty_on_the_whole_completion(kernel):
    fn = kernel.rewards.get("cspo_length")
    assert fn(["x", "y"], [{}, {}], completion_lengths=[50, 200]) == [-0.5, -2.0]
    from metareason.models import build_char_tokenizer

    tok = build_char_tokenizer()
    assert fn(["abcd"], [{}], tokenizer=tok) == [-0.04]


def test_overthink_task(kernel):
    factory = kernel.tasks.get("causal_loop_overthink")
    task = factory({"levels": [1], "split": "train", "checks": [1, 3]}, 0, 200)
    again = factory({"levels": [1], "split": "train", "checks": [1, 3]}, 0, 200)
    seen = set()
    for i in range(len(task)):
        ex = task[i]
        assert ex == again[i]  # a pure function of (seed, index)
        steps = ex["solution"].rpartition("answer:")[0].rstrip(";")
        assert 1 <= ex["checks"] <= 3 and ex["completion"].count(steps) == 1 + ex["checks"]
        assert ex["completion"].startswith(steps + ";") and ex["completion"].endswith("answer:" + ex["answer"])
        assert parse_answer(ex["completion"]) == ex["answer"] and task.score(ex["completion"], ex) == 1.0
        seen.add(ex["checks"])
    assert seen == {1, 2, 3}
    with pytest.raises(ConfigError, match=r"data.train\[0\]: params.checks"):
        k = Kernel({"plugins": ["cspo"], "data": {"train": [{"task": "causal_loop_overthink",
                                                             "params": {"checks": [3, 1]}}]}})
        k.build_task(k.config.data.train[0], field="data.train[0]")
