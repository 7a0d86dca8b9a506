"""The jsonl and reasoning_gym/<name> tasks, and exporting a non-causal-loop task."""
import argparse
import json

import pytest

from metareason.data.base import TaskError
from metareason.data import jsonl_task, reasoning_gym_task


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


RECORDS = [{"question": f"What is {i}+{i}?", "answer": 2 * i, "level": f"l{i % 3}", "extra": [i]}
           for i in range(20)]


# ------------------------------------------------------------------------------------ jsonl
def test_jsonl_default_fields_shuffle_and_cap(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [json.dumps(r) for r in RECORDS[:10]] + [""] +
                  [json.dumps(r) for r in RECORDS[10:]])
    task = jsonl_task.make_task({"path": path}, 0, 1000)
    assert len(task) == 20
    assert sorted(e["prompt"] for e in task) == sorted(r["question"] for r in RECORDS)
    ex = next(e for e in task if e["prompt"] == "What is 3+3?")
    assert ex["answer"] == "6" and ex["completion"] == "6" and ex["group"] == "all"
    assert ex["extra"] == [3] and ex["level"] == "l0" and ex["id"] == "qa.jsonl/4"
    # the seed shuffles, deterministically
    order0 = [e["id"] for e in task]
    assert order0 == [e["id"] for e in jsonl_task.make_task({"path": path}, 0, 1000)]
    assert order0 != [e["id"] for e in jsonl_task.make_task({"path": path}, 1, 1000)]
    assert order0 != sorted(order0, key=lambda s: int(s.split("/")[1]))
    # num_samples caps (after the shuffle)
    capped = jsonl_task.make_task({"path": path}, 0, 5)
    assert [e["id"] for e in capped] == order0[:5]
    unshuffled = jsonl_task.make_task({"path": path, "shuffle": False}, 0, 3)
    assert [e["prompt"] for e in unshuffled] == [r["question"] for r in RECORDS[:3]]


def test_jsonl_configurable_fields_and_scoring(tmp_path):
    lines = [json.dumps({"q": "x?", "a": "42", "sol": "think... answer: 42", "g": "easy", "uid": "u1"}),
             json.dumps({"q": "y?", "a": 7, "sol": "answer: 7", "g": "hard", "uid": "u2"})]
    path = _write(tmp_path / "d.jsonl", lines)
    task = jsonl_task.make_task({"path": path, "question_field": "q", "answer_field": "a",
                                 "completion_field": "sol", "group_field": "g", "id_field": "uid",
                                 "shuffle": False}, 0, 10)
    ex = task[0]
    assert ex == {"id": "u1", "prompt": "x?", "completion": "think... answer: 42", "answer": "42",
                  "group": "easy"}
    assert task.groups() == ["easy", "hard"]
    assert task.score("so the Answer: 42", ex) == 1.0
    assert task.score("answer: 41", ex) == 0.0
    assert task.score("answer: 42.0", ex) == 1.0      # numbers compare as numbers
    assert task.score("42", ex) == 1.0                # no marker: the whole completion
    assert task.score("the result is \\boxed{42}", ex) == 1.0
    assert task.score("", ex) == 0.0


def test_jsonl_errors_name_file_line_and_parameter(tmp_path):
    good = json.dumps({"question": "q", "answer": "a"})
    bad_json = _write(tmp_path / "bad.jsonl", [good, "", '{"question": "q", "answer": '])
    with pytest.raises(TaskError, match=r"bad\.jsonl:3: invalid JSON"):
        jsonl_task.make_task({"path": bad_json}, 0, 10)
    missing = _write(tmp_path / "missing.jsonl", [good, json.dumps({"question": "q"})])
    with pytest.raises(TaskError, match=r"missing\.jsonl:2: missing field 'answer' \(params\.answer_field\)"):
        jsonl_task.make_task({"path": missing}, 0, 10)
    not_obj = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(TaskError, match=r"list\.jsonl:1: expected a JSON object"):
        jsonl_task.make_task({"path": not_obj}, 0, 10)
    with pytest.raises(TaskError, match=r"missing field 'sol' \(params\.completion_field\)"):
        jsonl_task.make_task({"path": _write(tmp_path / "ok.jsonl", [good]), "completion_field": "sol"}, 0, 10)
    with pytest.raises(TaskError, match=r"^params\.path: field required$"):
        jsonl_task.make_task({}, 0, 10)
    with pytest.raises(TaskError, match=r"params\.path: file not found"):
        jsonl_task.make_task({"path": str(tmp_path / "nope.jsonl")}, 0, 10)
    with pytest.raises(TaskError, match=r"^params\.colour: unknown field$"):
        jsonl_task.make_task({"path": str(tmp_path / "ok.jsonl"), "colour": 1}, 0, 10)


@pytest.mark.parametrize("params,message", [
    ({"path": 3}, "params.path: Input should be a valid string (got 3)"),
    ({"path": "a.jsonl", "shuffle": "yes"}, "params.shuffle: Input should be a valid boolean (got 'yes')"),
    ({"path": "a.jsonl", "answer_field": ""}, "params.answer_field: String should have at least 1 character (got '')"),
    ({"path": "a.jsonl", "question_field": "q", "messages_field": "m"},
     "params.messages_field: Value error, set either messages_field or question_field, not both (got 'm')"),
])
def test_jsonl_params_are_a_pydantic_model_with_the_configs_errors(params, message):
    with pytest.raises(TaskError) as err:
        jsonl_task.make_task(params, 0, 10)
    assert str(err.value) == message


def test_a_bad_task_parameter_is_one_line_naming_file_spec_and_field(tmp_path):
    """Through the kernel: the same form as any other config error (file: field.path: message)."""
    from metareason.config import ConfigError
    from metareason.kernel import Kernel

    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  train:\n    - {task: jsonl, params: {path: x.jsonl, shufle: false}}\n")
    kernel = Kernel(cfg)
    with pytest.raises(ConfigError) as err:
        kernel.build_task(kernel.config.data.train[0], field="data.train[0]")
    assert str(err.value) == f"{cfg}: data.train[0]: params.shufle: unknown field"


# ----------------------------------------------------------------------------- reasoning gym
def test_reasoning_gym_task_scores_with_the_dataset_scorer():
    task = reasoning_gym_task.make_task({"name": "leg_counting", "min_animals": 2, "max_animals": 3}, 5, 6)
    assert len(task) == 6 and task.name == "reasoning_gym/leg_counting"
    ex = task[0]
    assert ex["completion"] == ex["answer"] and ex["group"] == "leg_counting"
    assert "legs" in ex["prompt"] and 2 <= ex["metadata"]["num_animals"] <= 3
    assert task.score(ex["answer"], ex) == 1.0
    assert task.score(f"Let me count.\nanswer: {ex['answer']}", ex) == 1.0
    assert task.score(f"<answer>{ex['answer']}</answer>", ex) == 1.0
    assert task.score(str(int(ex["answer"]) + 1), ex) == 0.0
    assert task.score("", ex) == 0.0
    # deterministic by seed, different across seeds
    again = reasoning_gym_task.make_task({"name": "leg_counting", "min_animals": 2, "max_animals": 3}, 5, 6)
    assert list(again) == list(task)
    other = reasoning_gym_task.make_task({"name": "leg_counting", "min_animals": 2, "max_animals": 3}, 6, 6)
    assert [e["prompt"] for e in other] != [e["prompt"] for e in task]


def test_reasoning_gym_any_generator_through_the_kernel_family():
    from metareason.kernel import Kernel

    factory, extra = Kernel().tasks.lookup("reasoning_gym/basic_arithmetic")
    task = factory(dict({}, **extra), 0, 4)
    ex = task[1]
    assert task.score(ex["answer"], ex) == 1.0 and task.score("answer: 123456789", ex) == 0.0


def test_reasoning_gym_worked_solution_becomes_the_completion():
    task = reasoning_gym_task.make_task({"name": "gsm_symbolic"}, 0, 2)
    ex = task[0]
    assert ex["completion"].endswith(f"\nanswer: {ex['answer']}") and len(ex["completion"]) > len(ex["answer"]) + 10
    assert task.score(ex["completion"], ex) == 1.0


def test_reasoning_gym_last_integer_extraction():
    """``extract: last_integer``: a completion without the marker is scored on its last integer
    (the default scores the whole text, which a worked answer never equals); the marker still wins."""
    task = reasoning_gym_task.make_task({"name": "gcd", "extract": "last_integer"}, 0, 3)
    plain = reasoning_gym_task.make_task({"name": "gcd"}, 0, 3)
    ex = task.example(0)
    worked = f"Divide and take remainders: ... so the GCD is {ex['answer']}."
    assert task.score(worked, ex) == 1.0 and plain.score(worked, ex) < 1.0
    assert task.extract_answer("it is -12, not 7") == "7" and task.extract_answer("no digits") is None
    assert task.score(f"{ex['answer']} ... answer: 999999", ex) < 1.0  # the marker wins
    assert task.extract_answer("x <answer>5</answer> then 9") == "5"
    with pytest.raises(TaskError, match=r"params\.extract: 'first' is not one of marker, last_integer"):
        reasoning_gym_task.make_task({"name": "gcd", "extract": "first"}, 0, 3)


def test_reasoning_gym_errors():
    with pytest.raises(TaskError) as err:
        reasoning_gym_task.make_task({"name": "leg_countin"}, 0, 3)
    assert "params.name: unknown reasoning-gym dataset 'leg_countin'" in str(err.value)
    assert "leg_counting" in str(err.value) and "basic_arithmetic" in str(err.value)
    with pytest.raises(TaskError, match=r"params\.wings: unknown parameter for reasoning_gym/leg_counting "
                                        r"\(known: min_animals"):
        reasoning_gym_task.make_task({"name": "leg_counting", "wings": 2}, 0, 3)
    with pytest.raises(TaskError, match=r"params\.size: set the task spec's num_samples"):
        reasoning_gym_task.make_task({"name": "leg_counting", "size": 2}, 0, 3)
    with pytest.raises(TaskError, match=r"reasoning_gym/leg_counting rejected its config"):
        reasoning_gym_task.make_task({"name": "leg_counting", "min_animals": 0}, 0, 3)


# ------------------------------------------------------------------------------------ export
def test_export_any_registered_task(tmp_path):
    from metareason.data import export

    src = _write(tmp_path / "src.jsonl", [json.dumps(r) for r in RECORDS])
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["jsonl", "--out", str(out), "--num-samples", "7", "--param", f"path={src}",
                              "--quiet", "--name", "copy"])
    assert export.run(args) == 0
    rows = [json.loads(line) for line in (out / "copy.jsonl").read_text().splitlines()]
    assert rows == list(jsonl_task.make_task({"path": src}, 0, 7))
    args = parser.parse_args(["reasoning_gym/leg_counting", "--out", str(out), "--num-samples", "3",
                              "--format", "parquet", "--quiet"])
    assert export.run(args) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out / "reasoning_gym_leg_counting.parquet").to_pylist()
    assert len(table) == 3 and json.loads(table[0]["metadata"])["source_dataset"] == "leg_counting"
    with pytest.raises(TaskError, match="--levels: only for causal_loop"):
        export.run(parser.parse_args(["jsonl", "--out", str(out), "--levels", "1"]))
