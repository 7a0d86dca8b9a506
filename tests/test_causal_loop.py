"""The causal-loop task: every example is re-derived by an independent tiny interpreter written
here (no eval), plus determinism, range bounds, loop semantics on hand-made cases, the answer
parser, the reward, splits, export and the data benchmark."""
import argparse
import json
import operator
import os
import re

import numpy as np
import pytest

from metareason.data import causal_loop as cl
from metareason.data.base import TaskError
from metareason.data.causal_loop import make_task, parse_answer, reward_exact_match

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "%": operator.mod}
STMT = re.compile(r"^([A-Z])=(?:([0-9]+)|([A-Z]|[0-9]+)([-+*%])([A-Z]|[0-9]+))$")


# ------------------------------------------------------------------------ reference interpreter
def _parse(stmts):
    out = []
    for s in stmts:
        m = STMT.match(s)
        assert m, f"cannot parse statement {s!r}"
        var, lit, x, op, y = m.groups()
        out.append((var, int(lit)) if lit is not None else (var, x, op, y))
    return out


def interpret(prompt, max_value=99):
    """Run a prompt; returns (answer, rounds, trace) where trace is a list of rounds, each a list
    of executed steps (var, a, op, b, result). Checks constants, moduli and the value range."""
    m = re.fullmatch(r"(.*?);(?:loop\{(.*)\};)?([A-Z])=\?", prompt)
    assert m, prompt
    init, body, query = m.groups()
    env = {}
    steps_init = _parse(init.split(";"))

    def run(stmt):
        var, x, op, y = stmt
        a = env[x] if x.isalpha() else int(x)
        b = env[y] if y.isalpha() else int(y)
        if not x.isalpha() or not y.isalpha():  # a constant operand
            c = int(y if x.isalpha() else x)
            if op == "%":
                assert 2 <= c <= 9, prompt
            else:
                assert 1 <= c <= 9, prompt
        r = OPS[op](a, b)
        assert 0 <= r <= max_value, f"{prompt}: {var}={a}{op}{b}={r} leaves 0..{max_value}"
        env[var] = r
        return (var, a, op, b, r)

    trace = [[]]
    for st in steps_init:
        if len(st) == 2:
            assert 1 <= st[1] <= 9, prompt
            env[st[0]] = st[1]
        else:
            trace[0].append(run(st))
    if body is None:
        return env[query], 0, trace
    state_vars = sorted(env)
    seen = [tuple(env[v] for v in state_vars)]
    trace = []
    loop = _parse(body.split(";"))
    for rounds in range(1, 1000):
        trace.append([run(st) for st in loop])
        state = tuple(env[v] for v in state_vars)
        if state in seen:
            return env[query], rounds, trace
        seen.append(state)
    raise AssertionError(f"{prompt}: no repeat")


def expected_completion(answer, trace):
    return "|".join(";".join(f"{v}={a}{op}{b}={r}" for v, a, op, b, r in rnd) for rnd in trace) + f";answer:{answer}"


# ----------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def mixed():
    return list(make_task({}, 3, 8000))


def test_every_example_matches_the_reference_interpreter(mixed):
    levels = {1: 0, 2: 0, 3: 0, 4: 0}
    for ex in mixed:
        answer, rounds, trace = interpret(ex["prompt"])
        assert ex["answer"] == str(answer), ex
        assert ex["completion"] == expected_completion(answer, trace), ex
        assert ex["group"] == f"level_{ex['level']}"
        if ex["level"] in (2, 4):
            assert ex["rounds"] == rounds and 1 <= rounds <= 6, ex
        else:
            assert "rounds" not in ex
        levels[ex["level"]] += 1
    assert levels == {1: 2000, 2: 2000, 3: 2000, 4: 2000}


def test_formats_and_default_difficulty(mixed):
    by = {lv: [e for e in mixed if e["level"] == lv] for lv in (1, 2, 3, 4)}
    # level 1: a chain of 4 variables with +, -, * and constants 1-9
    for e in by[1]:
        assert re.fullmatch(r"A=[1-9];B=A[-+*][1-9];C=B[-+*][1-9];D=C[-+*][1-9];D=\?", e["prompt"]), e
    ops = {op for e in by[1] for op in re.findall(r"[A-Z]([-+*])[1-9]", e["prompt"])}
    assert ops == {"+", "-", "*"}
    assert any(int(e["answer"]) >= 50 for e in by[1])  # values really use the range
    for e in by[2]:
        assert re.fullmatch(r"A=[1-9];loop\{B=A[-+*][1-9];C=B[-+*][1-9];A=C%[2-9]\};A=\?", e["prompt"]), e
        assert len(e["completion"]) < 200
    for e in by[3]:
        assert re.fullmatch(r"A=[1-9];B=[1-9];C=A[-+*][1-9];D=B[-+*][1-9];E=(C\+D|C-D|D-C|C\*D);"
                            r"F=E[-+*][1-9];F=\?", e["prompt"]), e
    assert {re.search(r"E=(...)", e["prompt"]).group(1) for e in by[3]} == {"C+D", "C-D", "D-C", "C*D"}
    for e in by[4]:
        assert re.fullmatch(r"A=[1-9];B=[1-9];loop\{C=A[-+*]B;A=C%[2-9];D=A[-+*][1-9];B=D%[2-9]\};[AB]=\?",
                            e["prompt"]), e
    for lv in (2, 4):
        assert {e["rounds"] for e in by[lv]} >= {1, 2, 3, 4, 5, 6} - ({1} if lv == 4 else set())


def test_determinism_across_num_samples_chunks_and_seeds():
    p = {"levels": [1, 2, 3, 4]}
    small = list(make_task(p, 11, 40))
    big = make_task(p, 11, 1000)
    assert small == big[:40]
    cfg = cl.parse_params(p)
    part = list(cl.iter_examples(cl.generate_columns(cfg, 11, 123, 777), 11, 123))
    assert part == big[123:777]
    assert list(make_task(p, 12, 40)) != small
    # an example depends on its own level and index, not on the other levels chosen
    only4 = make_task({"levels": [2, 4]}, 11, 8)
    assert only4[3] == big[3]  # index 3 is level 4 in both


def test_values_stay_in_range_with_a_smaller_bound():
    for ex in make_task({"max_value": 30, "chain_length": 6}, 5, 2000):
        answer, _, trace = interpret(ex["prompt"], max_value=30)  # asserts every value <= 30
        assert ex["answer"] == str(answer)


def test_pick_step_never_leaves_the_range():
    v = np.arange(100).repeat(50)
    bits = cl._Draws(cl._mix(np.arange(v.size, dtype=np.uint64))).bits(0)
    op, c, r = cl._pick_step(v, bits, 99, 9)
    assert ((r >= 0) & (r <= 99)).all() and ((c >= 1) & (c <= 9)).all()
    assert np.array_equal(r, np.where(op == 0, v + c, np.where(op == 1, v - c, v * c)))
    assert set(op[v == 5].tolist()) == {0, 1, 2}


class FixedDraws:
    """Stands in for the hash draws: slot -> value (same for every sample)."""

    def __init__(self, values):
        self.values = values

    def draw(self, slot, n):
        return np.array([self.values.get(slot, 0)])


def _loop2(a0, op1, c1, op2, c2, mod, **cfg):
    # slots of _sample_2: 0 start-1, 1 mod-2, 2..3 ops, 4..5 consts-1
    d = FixedDraws({0: a0 - 1, 1: mod - 2, 2: op1, 3: op2, 4: c1 - 1, 5: c2 - 1})
    config = cl.parse_params(dict(levels=[2], **cfg))
    s = cl._sample_2(d, config, False)
    return s, config


def test_level2_cycle_and_fixed_point_detection_on_hand_made_cases():
    # A=4;loop{B=A+2;C=B*2;A=C%5}: A 4 -> 2 -> 3 -> 0 -> 4, back to the start after 4 rounds
    s, config = _loop2(4, cl.ADD, 2, cl.MUL, 2, 5)
    assert s["valid"][0] and s["rounds"][0] == 4 and s["answer"][0] == 4
    prompts, comps = cl._render_2(s, config)
    assert prompts == ["A=4;loop{B=A+2;C=B*2;A=C%5};A=?"]
    assert comps == ["B=4+2=6;C=6*2=12;A=12%5=2|B=2+2=4;C=4*2=8;A=8%5=3|B=3+2=5;C=5*2=10;A=10%5=0|"
                     "B=0+2=2;C=2*2=4;A=4%5=4;answer:4"]
    # the seed's example A=1: B=3, C=6, A=1 -- a fixed point after one round
    s, _ = _loop2(1, cl.ADD, 2, cl.MUL, 2, 5)
    assert s["valid"][0] and s["rounds"][0] == 1 and s["answer"][0] == 1
    # a cycle that does not contain the start: A=9;loop{B=A*1;C=B+1;A=C%3}: 9 -> 1 -> 2 -> 0 -> 1
    s, _ = _loop2(9, cl.MUL, 1, cl.ADD, 1, 3)
    assert s["valid"][0] and s["rounds"][0] == 4 and s["answer"][0] == 1
    # the same with max_rounds 3: no repeat within the cap -> rejected (resampled)
    s, _ = _loop2(9, cl.MUL, 1, cl.ADD, 1, 3, max_rounds=3)
    assert not s["valid"][0]
    # A=1;loop{B=A-5;...}: leaves the range in round 1 -> rejected
    s, _ = _loop2(1, cl.SUB, 5, cl.ADD, 1, 3)
    assert not s["valid"][0]
    # A=2;loop{B=A*9;C=B-9;A=C%9}: 2 -> 0 in round 1, then 0*9-9 = -9 leaves the range in round 2
    s, _ = _loop2(2, cl.MUL, 9, cl.SUB, 9, 9)
    assert not s["valid"][0]


def test_first_repeat_on_states():
    states = np.array([[4, 2, 3, 0, 4, 2, 3],   # back to the start after 4
                       [1, 1, 1, 1, 1, 1, 1],   # fixed point at once
                       [9, 1, 2, 0, 1, 2, 0],   # rho: 1 repeats at round 4
                       [1, 2, 3, 4, 5, 6, 7]])  # never within the cap
    assert cl._first_repeat(states).tolist() == [4, 1, 4, 0]


def test_loop_rounds_cap_and_safe_fallback():
    task = make_task({"levels": [2, 4], "max_rounds": 3}, 0, 600)
    for ex in task:
        answer, rounds, trace = interpret(ex["prompt"])
        assert ex["rounds"] == rounds <= 3 and ex["answer"] == str(answer)
    # the fallback family always satisfies the bounds
    cfg = cl.parse_params({"levels": [2, 4], "max_rounds": 3})
    keys = cl._mix(np.arange(3000, dtype=np.uint64))
    for sampler in (cl._sample_2, cl._sample_4):
        assert sampler(cl._Draws(keys), cfg, True)["valid"].all()


def test_solution_false_and_other_shapes():
    for ex in make_task({"solution": False}, 1, 40):
        assert ex["completion"] == f"answer:{ex['answer']}"
    for ex in make_task({"levels": [3], "branch_ops": 2, "tail_ops": 2, "loop_ops": 3}, 1, 300):
        answer, _, trace = interpret(ex["prompt"])
        assert ex["completion"] == expected_completion(answer, trace)
    for ex in make_task({"levels": "2", "loop_ops": 3}, 1, 300):
        answer, rounds, trace = interpret(ex["prompt"])
        assert ex["completion"] == expected_completion(answer, trace) and ex["rounds"] == rounds


def test_splits_are_disjoint_problem_sets():
    p = {"levels": [1]}
    train = {e["prompt"] for e in make_task(dict(p, split="train"), 0, 20000)}
    test = [e["prompt"] for e in make_task(dict(p, split="test"), 1, 2000)]
    assert not train & set(test)
    everything = {e["prompt"] for e in make_task(p, 0, 20000)}
    assert everything & {e["prompt"] for e in make_task(p, 1, 2000)}  # without splits they overlap
    # the test split is about test_fraction of the problems
    cols = cl.sample_level(1, np.arange(5000), 2, cl.parse_params(p))
    frac = cl._in_split(cols["hash"], cl.parse_params(dict(p, split="test"))).mean()
    assert 0.07 < frac < 0.13


def test_validation_split_is_disjoint_from_train_and_test():
    p = {"levels": [1], "val_fraction": 0.1}
    train = {e["prompt"] for e in make_task(dict(p, split="train"), 0, 20000)}
    val = [e["prompt"] for e in make_task(dict(p, split="validation"), 1, 1000)]
    test = {e["prompt"] for e in make_task(dict(p, split="test"), 2, 1000)}
    assert not train & set(val) and not test & set(val) and not train & test
    # the test split does not move when a validation split is cut out of train
    assert test == {e["prompt"] for e in make_task({"levels": [1], "split": "test"}, 2, 1000)}
    cols = cl.sample_level(1, np.arange(5000), 2, cl.parse_params(p))
    fracs = [cl._in_split(cols["hash"], cl.parse_params(dict(p, split=s))).mean() for s in ("train", "validation", "test")]
    assert abs(sum(fracs) - 1) < 1e-9 and 0.07 < fracs[1] < 0.13
    with pytest.raises(TaskError, match="params.val_fraction"):
        cl.parse_params({"split": "validation"})


@pytest.mark.parametrize("text, expected", [
    ("B=3+2=5;C=5*2=10;D=10-1=9;answer:9", "9"),
    ("answer:9", "9"),
    ("Answer: 09", "9"),
    ("answer = -3", "-3"),
    ("answer: +7", "7"),
    ("the answer:99.", "99"),
    ("answer:12abc", "12"),
    ("answer:9;answer:10", "9"),          # the first marker decides
    ("answer:9.5", None),                 # not an integer
    ("answer:x;answer:4", None),          # the first marker has no integer
    ("answer:", None),
    ("B=3+2=5;C=5*2=10", None),           # no marker
    ("the result is 9", None),
    ("answer:\u0663", None),              # non-ASCII digit
    ("", None),
    (None, None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_reward_and_task_score():
    task = make_task({"levels": [1]}, 0, 3)
    ex = task[0]
    right = ex["completion"]
    wrong = right.replace(f"answer:{ex['answer']}", f"answer:{int(ex['answer']) + 1}")
    assert reward_exact_match([right, wrong, "garbage", f"answer: 0{ex['answer']}"], [ex] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert task.score(right, ex) == 1.0 and task.score(wrong, ex) == 0.0
    assert task.extract_answer(right) == ex["answer"]
    with pytest.raises(ValueError):
        reward_exact_match(["a"], [])


def test_registered_through_the_kernel():
    from metareason.kernel import Kernel

    kernel = Kernel()
    factory, extra = kernel.tasks.lookup("causal_loop")
    task = factory(dict({"levels": [1, 2]}, **extra), 0, 10)
    assert task.groups() == ["level_1", "level_2"]
    reward = kernel.rewards.get("causal_loop_exact")
    assert reward([task[0]["completion"], "answer:-1"], [task[0], task[0]]) == [1.0, 0.0]


@pytest.mark.parametrize("params, message", [
    ({"levels": [1, 7]}, "params.levels: level 7 does not exist (1-4)"),
    ({"levels": "1,x"}, "params.levels: 'x' is not a level"),
    ({"levels": []}, "params.levels"),
    ({"chain_length": 1}, "params.chain_length: 1 is out of range"),
    ({"solution": "yes"}, "params.solution"),
    ({"split": "dev"}, "params.split"),
    ({"max_rounds": "6"}, "params.max_rounds: expected an integer"),
    ({"colour": 1}, "params.colour: unknown parameter"),
])
def test_bad_params_name_the_parameter(params, message):
    with pytest.raises(TaskError) as err:
        make_task(params, 0, 5)
    assert message in str(err.value)


def test_indexing_and_iteration():
    task = make_task({}, 0, 10)
    assert len(task) == 10 and task[-1] == task[9] and list(task) == [task[i] for i in range(10)]
    assert task.examples[2] == task[2]
    with pytest.raises(IndexError):
        task[10]


# ------------------------------------------------------------------------- export and bench
def _export_args(tmp_path, *extra):
    from metareason.data import export

    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export, parser.parse_args(["causal_loop", "--out", str(tmp_path), "--quiet", *extra])


def test_export_jsonl_and_parquet_match_the_task(tmp_path):
    export, args = _export_args(tmp_path, "--levels", "1,2,3,4", "--num-samples", "45000", "--seed", "4")
    assert export.run(args) == 0
    task = make_task({"levels": [1, 2, 3, 4]}, 4, 45000)
    with open(tmp_path / "causal_loop.jsonl", encoding="utf-8") as f:
        lines = f.readlines()
    assert len(lines) == 45000
    for i in (0, 1, 2, 3, 19999, 20000, 20001, 44999):
        assert json.loads(lines[i]) == task[i]
    assert [json.loads(line) for line in lines[::997]] == task[::997]
    export, args = _export_args(tmp_path, "--levels", "2,4", "--num-samples", "300", "--format", "parquet",
                                "--param", "split=test")
    assert export.run(args) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "causal_loop.parquet").to_pylist()
    ref = make_task({"levels": [2, 4], "split": "test"}, 0, 300)
    assert [{k: v for k, v in r.items() if v is not None} for r in rows] == list(ref)
    assert sorted(os.listdir(tmp_path)) == ["causal_loop.jsonl", "causal_loop.parquet"]


def test_export_is_atomic(tmp_path, monkeypatch):
    export, args = _export_args(tmp_path, "--num-samples", "100")
    assert export.run(args) == 0
    before = (tmp_path / "causal_loop.jsonl").read_bytes()
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash mid-write")
        return cl.generate_columns(*a, **k)

    monkeypatch.setattr(cl, "generate_columns", failing)
    monkeypatch.setattr(export, "CHUNK", 30)
    _, args = _export_args(tmp_path, "--num-samples", "100", "--seed", "9")
    with pytest.raises(RuntimeError):
        export.run(args)
    assert (tmp_path / "causal_loop.jsonl").read_bytes() == before
    assert os.listdir(tmp_path) == ["causal_loop.jsonl"]


def test_bench_data_writes_results(tmp_path, capsys):
    from metareason.benchmarks import data

    parser = argparse.ArgumentParser()
    data.add_arguments(parser)
    out = tmp_path / "data-cpu.json"
    args = parser.parse_args(["--num-samples", "2000", "--repeats", "1", "--workers", "2", "--out", str(out),
                              "--quiet"])
    assert data.run(args) == 0
    result = json.loads(out.read_text())
    assert result["seed_claim_samples_per_s"] == 150_000
    for row in ("in_memory", "columns", "level_1", "level_4", "parallel_2proc", "jsonl_write"):
        assert result["results"][row]["samples_per_s"] > 0
    assert "samples/s" in capsys.readouterr().out
