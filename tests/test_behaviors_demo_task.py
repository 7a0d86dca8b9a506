"""The redesigned demo task (issue 28): the method format's two teachers, the held-out chains,
the long-hand single-procedure pretraining examples, and the behavior block in the order of
application beside a control block of the same length."""
import re

import pytest

from metareason.data.base import TaskError
from metareason.plugins.behaviors import demo_task as d

STEP = re.compile(r"([a-z]+) (\d+): ([^:]+): ([^:]+?) -> (\d+)\.")
NUMBERS = (472, 108, 990, 765, 301)


def block_lines(prompt):
    head = prompt.split("Q: ")[0]
    return [line[2:].split(":")[0] for line in head.splitlines() if line.startswith("- ")]


def steps(text):
    """(op, input, head, digit work, result) of every step of a method-format answer."""
    return STEP.findall(text)


def test_plain_teacher_restates_each_method_before_the_digit_work():
    text = d.teacher_method(d.method_question("fold", 472))
    assert text == ("rev 472: write the digits from the last one to the first one: 2 7 4 -> 274. "
                    "dbl 274: double each digit from the right and add the carry of the digit before: "
                    "4*2=8 7*2=14 2*2+1=5 -> 548. "
                    "dsum 548: add the digits one at a time from the left keeping a running total: "
                    "5+4=9 9+8=17 -> 17. answer 17")
    assert "behavior_" not in text


def test_bci_teacher_cites_instead_of_restating_and_keeps_the_digit_work():
    text = d.teacher_method(d.bci_prompt("fold", 472))
    assert text == ("rev 472: behavior_rev: 2 7 4 -> 274. dbl 274: behavior_dbl: 4*2=8 7*2=14 2*2+1=5 -> 548. "
                    "dsum 548: behavior_dsum: 5+4=9 9+8=17 -> 17. answer 17")
    for topic in d.ALL_TOPICS:
        for n in NUMBERS:
            plain = d.teacher_method(d.method_question(topic, n))
            bci = d.teacher_method(d.bci_prompt(topic, n))
            p, b = steps(plain), steps(bci)
            assert len(p) == len(b) == len(d.ALL_TOPICS[topic])
            # same procedures, inputs, digit work and results; only the head differs
            assert [(op, x, work, y) for op, x, _, work, y in p] == [(op, x, work, y) for op, x, _, work, y in b]
            assert [h for _, _, h, _, _ in p] == [d.METHODS[op] for op in d.ALL_TOPICS[topic]]
            assert [h for _, _, h, _, _ in b] == [d.behavior_name(op) for op in d.ALL_TOPICS[topic]]
            assert all(work.strip() for *_, work, _ in b)  # the digit work is there, not just the result
            assert plain.rsplit("answer ", 1)[1] == bci.rsplit("answer ", 1)[1] == str(d.solve_method(topic, n)[1])
            assert len(bci) < len(plain)
            assert not any(m in bci for m in d.METHODS.values())


def test_bci_teacher_cites_only_the_behaviors_in_its_block():
    prompt = d.behavior_block(["behavior_dbl"], {"behavior_dbl": d.PROCEDURES["dbl"]}).replace(
        "{question}", d.method_question("fold", 472))
    heads = [h for _, _, h, _, _ in steps(d.teacher_method(prompt))]
    assert heads == [d.METHODS["rev"], "behavior_dbl", d.METHODS["dsum"]]


def test_block_lists_behaviors_in_the_order_of_application():
    for topic, chain in d.ALL_TOPICS.items():
        assert block_lines(d.bci_prompt(topic, 472)) == [f"behavior_{op}" for op in dict.fromkeys(chain)], topic
    # neither alphabetical nor the handbook's insertion order
    assert block_lines(d.bci_prompt("churn", 472)) == ["behavior_sort", "behavior_rev", "behavior_dbl"]
    assert block_lines(d.bci_prompt("mirror", 472)) == ["behavior_rev", "behavior_dbl"]
    assert block_lines(d.bci_prompt("sweep", 472)) == ["behavior_dbl", "behavior_rev"]
    prompt = d.bci_prompt("sweep", 472)
    assert prompt.startswith("Behaviors (use them where they apply and cite each one you use by its name):\n")
    assert "- behavior_dbl: double the number.\n- behavior_rev: reverse the digits.\n" in prompt
    assert prompt.endswith("Q: sweep 472: dbl then rev\nA: ")


def test_control_block_has_the_same_length_and_no_behavior_of_the_task():
    task_behaviors = {d.behavior_name(op) for op in d.PROCEDURES}
    for topic in d.ALL_TOPICS:
        real, control = d.bci_prompt(topic, 472), d.bci_prompt(topic, 472, control=True)
        assert len(block_lines(control)) == len(block_lines(real))
        assert not set(block_lines(control)) & task_behaviors
        assert abs(len(control) - len(real)) <= 5 * len(block_lines(real))  # about as many characters
        assert control.split("Behaviors")[1].split("\n", 1)[0] == real.split("Behaviors")[1].split("\n", 1)[0]
        assert control.endswith(d.method_question(topic, 472))
        # the teacher finds nothing to cite in it: the plain answer
        assert d.teacher_method(control) == d.teacher_method(d.method_question(topic, 472))


def test_heldout_topics_are_new_chains_of_known_procedures():
    train_chains = set(d.TOPICS.values())
    assert d.HELDOUT_TOPICS and not set(d.HELDOUT_TOPICS.values()) & train_chains
    assert not set(d.HELDOUT_TOPICS) & set(d.TOPICS)
    trained_ops = {op for chain in train_chains for op in chain}
    assert all(op in trained_ops for chain in d.HELDOUT_TOPICS.values() for op in chain)
    train = d.make_task({"format": "method"}, 0, 10 ** 6)
    assert {ex["topic"] for ex in train} == set(d.TOPICS)  # the default never trains on a held-out chain
    test = d.make_task({"format": "method", "split": "test", "topics": list(d.HELDOUT_TOPICS)}, 0, 200)
    assert {ex["topic"] for ex in test} == set(d.HELDOUT_TOPICS) and all(ex["heldout"] for ex in test)
    assert all(test.score(ex["completion"], ex) == 1.0 for ex in test)
    for ex in test:  # the question names its chain, so a model that knows the procedures can solve it
        assert ex["prompt"] == d.method_question(ex["topic"], int(ex["prompt"].split()[2].rstrip(":")))
        assert " then ".join(d.HELDOUT_TOPICS[ex["topic"]]) in ex["prompt"]


def test_pretraining_examples_are_long_hand_single_procedures():
    task = d.make_task({"format": "method", "kind": "pretrain"}, 0, 10 ** 6)
    assert {ex["topic"] for ex in task} == set(d.PROCEDURES)
    for ex in list(task)[:200]:
        (step,) = steps(ex["completion"])
        op, x, head, work, y = step
        assert ex["prompt"] == f"Q: {op} {x}\nA: " and head == d.METHODS[op]
        assert work and y == ex["answer"] == str(d.apply(op, int(x)))
        assert task.score(ex["completion"], ex) == 1.0
    test = d.make_task({"format": "method", "kind": "pretrain", "split": "test"}, 0, 10 ** 6)
    assert not {ex["prompt"] for ex in test} & {ex["prompt"] for ex in task}


def test_method_format_params_are_checked():
    with pytest.raises(TaskError, match="params.format"):
        d.make_task({"format": "long"}, 0, 5)
    with pytest.raises(TaskError, match="params.kind"):
        d.make_task({"kind": "pretrain"}, 0, 5)
    with pytest.raises(TaskError, match="params.topics"):
        d.make_task({"topics": ["flip"]}, 0, 5)  # held-out chains exist in the method format only
    assert d.make_task({}, 0, 3)[0]["completion"] == d.solve(d.make_task({}, 0, 3)[0]["topic"],
                                                              int(d.make_task({}, 0, 3)[0]["prompt"].split()[2]))[0]


def test_method_format_splits_are_disjoint_and_val_is_carved_from_train():
    def numbers(split, **kw):
        return {int(ex["prompt"].split()[2].rstrip(":"))
                for ex in d.make_task({"format": "method", "split": split, **kw}, 0, 10 ** 6)}

    train, val, test = numbers("train"), numbers("val"), numbers("test")
    assert train and val and test and not (train & val or train & test or val & test)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    legacy_train = {int(ex["prompt"].split()[2]) for ex in d.make_task({}, 0, 10 ** 6)}
    assert train | val == legacy_train  # the short format keeps its old split
    assert numbers("val", kind="pretrain") == val
    with pytest.raises(TaskError, match="params.split"):
        d.make_task({"split": "val"}, 0, 5)


def test_partial_block_keeps_its_length_and_the_teacher_cites_exactly_what_it_lists():
    prompt = d.bci_prompt("churn", 472, keep={"rev"})
    assert block_lines(prompt) == ["behavior_neg", "behavior_rev", "behavior_inc"]
    heads = [h for _, _, h, _, _ in steps(d.teacher_method(prompt))]
    assert heads == [d.METHODS["sort"], "behavior_rev", d.METHODS["dbl"]]
    for topic, chain in d.ALL_TOPICS.items():
        assert d.bci_prompt(topic, 472, keep=set(chain)) == d.bci_prompt(topic, 472)
        assert block_lines(d.bci_prompt(topic, 472, keep=set())) == block_lines(d.bci_prompt(topic, 472, control=True))


def test_block_conditions_and_answer_kinds_of_the_task():
    def task(**params):
        return d.make_task({"format": "method", "split": "test", "topics": list(d.ALL_TOPICS), **params}, 7, 10 ** 6)

    plain, cited = task(), task(answers="cited")
    by_block = {b: task(block=b) for b in d.BLOCKS}
    assert [ex["id"] for ex in plain] == [ex["id"] for ex in cited] == [ex["id"] for ex in by_block["control"]]
    for p, c, o, s, k in zip(plain, cited, by_block["ordered"], by_block["shuffled"], by_block["control"]):
        assert p["prompt"] == c["prompt"] == d.method_question(p["topic"], int(p["id"].rsplit("/", 1)[1]))
        assert "behavior_" not in p["completion"] and c["completion"] == o["completion"]  # BC-SFT data: cited answers, bare prompts
        assert block_lines(o["prompt"]) == d.behavior_order(o["topic"])
        assert sorted(block_lines(s["prompt"])) == sorted(block_lines(o["prompt"]))
        assert block_lines(s["prompt"]) != block_lines(o["prompt"]) or len(block_lines(o["prompt"])) == 1
        assert k["completion"] == p["completion"] and len(block_lines(k["prompt"])) == len(block_lines(o["prompt"]))
        assert p["answer"] == c["answer"] == o["answer"] == k["answer"]
    for t in (plain, cited, *by_block.values()):
        assert all(t.score(ex["completion"], ex) == 1.0 for ex in t)
    mix = list(by_block["mix"])
    kinds = {"none": 0, "full": 0, "partial": 0}
    for ex in mix:
        lines = block_lines(ex["prompt"])
        full = d.behavior_order(ex["topic"])
        kinds["none" if not lines else "full" if lines == full else "partial"] += 1
        assert len(lines) in (0, len(full))
        cited_here = re.findall(r"behavior_[a-z]+", ex["completion"])
        assert cited_here == [n for n in lines if n in full]  # cites exactly what its block lists, in order
    assert all(abs(v / len(mix) - 1 / 3) < 0.06 for v in kinds.values()), kinds
    assert [ex["prompt"] for ex in mix] == [ex["prompt"] for ex in task(block="mix")]  # seeded
    with pytest.raises(TaskError, match="params.block"):
        d.make_task({"format": "method", "block": "random"}, 0, 5)
    with pytest.raises(TaskError, match="params.block / params.answers"):
        d.make_task({"block": "ordered"}, 0, 5)


def test_eval_groups_name_the_block_condition():
    for block in d.BLOCKS:
        ex = d.make_task({"format": "method", "split": "test", "topics": ["flip"], "block": block}, 0, 1)[0]
        assert ex["group"] == ("flip" if block in ("none", "mix") else f"{block}/flip") and ex["block"] == block
