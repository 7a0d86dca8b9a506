"""memory_reason, issue 29: the varied-structure world (step types not predictable from position,
held-out questions disjoint from training), the base corpus and the fact-recall check, the
untyped filler control (as many tokens as the step tokens), first_prefix for chat templates, and
the fine error attribution (wrong entity / wrong value / wrong operation / structure)."""
import re
from collections import Counter

import pytest

from metareason import Kernel
from metareason.config import ConfigError
from metareason.data.base import TaskError
from metareason.plugins.memory_reason.analysis import analyse, attribute_error_fine
from metareason.plugins.memory_reason.config import MemoryReasonSection
from metareason.plugins.memory_reason.steps import Step, parse_generated, render
from metareason.plugins.memory_reason.tasks import make_world_task
from metareason.plugins.memory_reason.tokens import special_tokens, vocabulary
from metareason.plugins.memory_reason.world import STRUCTURES, TYPES, position_baseline, position_entropy
from metareason.train.loop import load_train_examples

from conftest import TINY_LLAMA

WORLD = {"entities": 16, "attributes": 3, "world_seed": 0}  # the design's world (docs/memory_reason.md)


def varied(split, n, seed=0, **extra):
    return make_world_task(dict(WORLD, kind="varied", split=split, **extra), seed, n).examples


# ------------------------------------------------------------------------------- structure
def test_every_structure_has_its_step_types_and_consistent_gold_steps():
    ex = varied("heldout", 700)
    assert {e["structure"] for e in ex} == set(STRUCTURES)
    for e in ex:
        types = "".join(s["type"][0] for s in e["cot_steps"])
        assert types == TYPES[e["structure"]]
        assert 1 <= types.count("m") <= 3 and 0 <= types.count("r") <= 2
        for s in e["cot_steps"]:  # every reason step is true arithmetic
            if "=" in s["text"]:
                lhs, rhs = s["text"].split("=")
                assert re.fullmatch(r"\d+([+-]\d+)*", lhs.replace(" ", "")), lhs
                assert sum(int(t) for t in re.findall(r"[+-]?\d+", lhs.replace(" ", ""))) == int(rhs)
            elif s["type"] == "reason":
                x, op, y = re.fullmatch(r"(\d+)([<>])(\d+)", s["text"]).groups()
                assert (int(x) > int(y)) == (op == ">")
        assert e["completion"].endswith(f"The answer is: {e['answer']}")


def test_step_type_is_not_predictable_from_position():
    """At every position but the last (only the answer line can come there) more than one type
    occurs, in training and held-out data; guessing by position is far from always right."""
    for ex in (varied("train", 3000), varied("heldout", 700)):
        ent = position_entropy(ex)
        assert all(h > 0.3 for h in ent[:-1]), ent
        assert ent[-1] == 0
        assert position_baseline(ex) < 0.8


def test_at_least_600_heldout_questions_disjoint_from_training_and_validation():
    held, val = varied("heldout", 10_000), varied("val", 10_000)
    train = varied("train", 20_000)
    assert len(held) >= 600 and len(val) >= 200
    prompts = {s: {e["prompt"] for e in x} for s, x in (("held", held), ("val", val), ("train", train))}
    assert len(prompts["held"]) == len(held)  # no question twice
    assert not prompts["held"] & prompts["train"] and not prompts["held"] & prompts["val"]
    assert not prompts["val"] & prompts["train"]
    # another data seed draws other questions, never a held-out one
    assert not {e["prompt"] for e in varied("train", 5000, seed=7)} & prompts["held"]
    # the base corpus shares no prompt with any question
    base = make_world_task(dict(WORLD, kind="pretrain"), 0, 5000).examples
    assert not {e["prompt"] for e in base} & (prompts["held"] | prompts["val"] | prompts["train"])


def test_heldout_takes_structures_round_robin_and_train_draws_them_uniformly():
    held = Counter(e["structure"] for e in varied("heldout", 700))
    assert min(held[s] for s in STRUCTURES if s != "hop") >= 60
    train = Counter(e["structure"] for e in varied("train", 9000))
    assert all(800 <= train[s] <= 1200 for s in STRUCTURES)


# ------------------------------------------------------------------------------- base corpus
def test_pretrain_corpus_has_every_fact_the_arithmetic_of_every_question_and_multi_entity_lines():
    n_facts = 16 * 3
    base = make_world_task(dict(WORLD, kind="pretrain"), 0, 4000).examples
    groups = Counter(e["group"] for e in base)
    assert set(groups) == {"fact", "arithmetic", "multi"}
    facts = [e for e in base if e["group"] == "fact"]
    assert len({e["id"] for e in facts[:n_facts]}) == n_facts  # every fact before any repeats
    arith = {e["cot_steps"][0]["text"] for e in make_world_task(dict(WORLD, kind="pretrain", mix={"arithmetic": 1}),
                                                                0, 20_000).examples}
    for e in varied("heldout", 10_000) + varied("train", 5000):
        for s in e["cot_steps"]:
            if s["type"] == "reason":
                assert s["text"] in arith, (e["id"], s["text"])
    multi = [e for e in base if e["group"] == "multi"]
    assert {len(e["cot_steps"]) for e in multi} == {2, 3}
    assert all(len({s["text"].split()[0] for s in e["cot_steps"]}) == len(e["cot_steps"]) for e in multi)
    with pytest.raises(TaskError, match="params.mix"):
        make_world_task(dict(WORLD, kind="pretrain", mix={"poems": 1}), 0, 10)


def test_recall_checks_every_fact_exactly_once():
    rec = make_world_task(dict(WORLD, kind="recall"), 0, 1000).examples
    assert len(rec) == 48 and len({(e["id"]) for e in rec}) == 48
    task = make_world_task(dict(WORLD, kind="recall"), 0, 1000)
    assert {(k[0], k[1]) for k in task.world} == {(e["id"].split("/")[3], e["id"].split("/")[2]) for e in rec}
    with pytest.raises(TaskError, match="checks every fact"):
        make_world_task(dict(WORLD, kind="recall"), 0, 20)


# ------------------------------------------------------------------------------- filler control
STEPS = [{"type": "memory", "text": "Ava has 3 pens."}, {"type": "memory", "text": "Bo has 4 pens."},
         {"type": "reason", "text": "3+4=7"}]


def kernel_config(tmp_path, **mr):
    return {"name": "mrw", "output_dir": str(tmp_path), "quiet": True,
            "model": {"arch": dict(TINY_LLAMA, tie_word_embeddings=True), "tokenizer": {"type": "char"},
                      "device": "cpu"},
            "data": {"max_length": 256,
                     "train": [{"task": "memory_world", "num_samples": 32,
                                "params": dict(WORLD, kind="varied")}],
                     "eval": [{"task": "memory_world", "num_samples": 4, "seed": 1,
                               "params": dict(WORLD, kind="varied", split="heldout")}]},
            "train": {"max_steps": 1, "batch_size": 4, "log_every": 1}, "generation": {"max_new_tokens": 8},
            "memory_reason": dict(enabled=True, mode="full", n_prefix=2, n_special=3, **mr)}


def test_filler_control_has_the_same_token_count_as_the_step_tokens_and_no_type(tmp_path):
    typed_k, filler_k = Kernel(kernel_config(tmp_path)), Kernel(kernel_config(tmp_path, filler=True))
    typed_ex, filler_ex = load_train_examples(typed_k), load_train_examples(filler_k)
    _, typed_tok = typed_k.load()
    _, filler_tok = filler_k.load()
    assert "<filler_0>" in filler_tok.get_vocab() and "<memory_0>" not in filler_tok.get_vocab()
    assert "<filler_0>" not in typed_tok.get_vocab()
    assert len(filler_tok) == len(typed_tok) - 6  # 3 types x 3 tokens -> 3 untyped tokens
    for a, b in zip(typed_ex, filler_ex):
        assert a["prompt"] == b["prompt"]
        n_a = len(typed_tok(a["completion"], add_special_tokens=False)["input_ids"])
        n_b = len(filler_tok(b["completion"], add_special_tokens=False)["input_ids"])
        assert n_a == n_b
        assert "<filler_0><filler_1><filler_2>" in b["completion"] and "<memory_" not in b["completion"]
        p_a = typed_k.chain("metareason_transform_prompt", "prompt", a["prompt"], example=a, config=typed_k.config)
        p_b = filler_k.chain("metareason_transform_prompt", "prompt", b["prompt"], example=b, config=filler_k.config)
        assert p_a == p_b == a["prompt"] + "<prefix_0><prefix_1>"
    # parsing the control's output: steps untyped, the answer line found, no type accuracy
    voc = vocabulary(MemoryReasonSection(enabled=True, filler=True, n_special=2))
    text = render(STEPS, "7", voc, True, "The answer is: ")
    steps = parse_generated(text, voc)
    assert [s.type for s in steps] == [None, None, None, "answer"]
    assert [s.text for s in steps[:3]] == [s["text"] for s in STEPS]
    stats = analyse([{"completion": text, "score": 1.0, "example": {"cot_steps": STEPS}}], voc, "The answer is: ")
    assert "type_accuracy" not in stats and stats["steps"] == 3


def test_filler_tokens_start_at_the_vocabulary_mean_and_need_step_tokens():
    toks = special_tokens(MemoryReasonSection(enabled=True, filler=True, n_prefix=1, n_special=2))
    assert [t.text for t in toks] == ["<prefix_0>", "<filler_0>", "<filler_1>"]
    assert all(t.init_from == () for t in toks)
    with pytest.raises(ValueError, match="filler.*needs step_tokens"):
        MemoryReasonSection(enabled=True, filler=True, step_tokens=False)
    with pytest.raises(ValueError, match="must differ"):
        MemoryReasonSection(enabled=True, filler_name="memory")


def test_first_prefix_completion_moves_the_prefix_into_the_reply(tmp_path):
    k = Kernel(kernel_config(tmp_path, first_prefix="completion"))
    ex = load_train_examples(k)[0]
    assert ex["completion"].startswith("<prefix_0><prefix_1><")
    assert k.chain("metareason_transform_prompt", "prompt", ex["prompt"], example=ex, config=k.config) == ex["prompt"]
    voc = vocabulary(MemoryReasonSection(enabled=True, n_special=1))
    assert [s.type for s in parse_generated(render(STEPS, "7", voc, True, "The answer is: ", "completion"), voc)] == \
        ["memory", "memory", "reason", "answer"]
    with pytest.raises(ConfigError):
        Kernel(kernel_config(tmp_path, first_prefix="system"))


# ------------------------------------------------------------------------------- attribution
def gen(*lines):
    return [Step("memory" if " has " in t else "reason", t) for t in lines] + [Step("answer", "The answer is: 0")]


@pytest.mark.parametrize("lines,cause", [
    (("Cy has 3 pens.", "Bo has 4 pens.", "3+4=7"), "entity"),       # another person's fact
    (("Ava has 3 cups.", "Bo has 4 pens.", "3+4=7"), "entity"),      # another attribute
    (("Ava has 3 pens.", "Bo has 5 pens.", "3+5=8"), "value"),       # right person, wrong value
    (("Ava has 3 pens.", "Bo has 4 pens.", "3+4=8"), "operation"),   # wrong result
    (("Ava has 3 pens.", "Bo has 4 pens.", "3-4=-1"), "operation"),  # wrong operator
    (("Ava has 3 pens.", "Bo has 4 pens."), "structure"),            # the reason step is missing
    (("Ava has 3 pens.", "3+4=7"), "structure"),                     # an operation where a fact was due
    (("Ava has 3 pens.", "Bo has 4 pens.", "Cy has 7 pens."), "structure"),  # a fact where an operation was due
    (("Ava has 3 pens.", "Bo has 4 pens.", "3+4=7"), "neither"),     # steps right, answer line wrong
])
def test_fine_attribution_separates_entity_value_operation(lines, cause):
    assert attribute_error_fine(gen(*lines), STEPS) == cause


def test_fine_attribution_shares_in_the_analysis_and_free_text_is_other():
    free = [{"type": "memory", "text": "Aristotle died in 322 BC."}, {"type": "reason", "text": "So no."}]
    assert attribute_error_fine(gen("Aristotle died in 300 BC."), free) == "other"
    samples = [{"completion": c, "score": 0.0, "example": {"cot_steps": STEPS}} for c in (
        "Cy has 3 pens.\nBo has 4 pens.\n3+4=7\nThe answer is: 7",
        "Ava has 3 pens.\nBo has 5 pens.\n3+5=8\nThe answer is: 8",
        "Ava has 3 pens.\nBo has 4 pens.\n3+4=8\nThe answer is: 8",
        "Ava has 3 pens.\nBo has 4 pens.\nThe answer is: 7")]
    stats = analyse(samples, None, "The answer is: ")
    assert (stats["error_entity"], stats["error_value"], stats["error_operation"], stats["error_structure"],
            stats["error_other"]) == (0.25, 0.25, 0.25, 0.25, 0.0)
    assert stats["error_memory"] == 0.5 and stats["error_reason"] == 0.5  # the coarse rule is unchanged
