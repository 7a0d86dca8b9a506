"""The issue 28 part B driver (bench/behaviors_smollm2.py) in miniature (``--quick``) on the real
SmolLM2-135M-Instruct: every stage runs through the CLI (the pilot, extraction by the model behind
a real ``metareason serve`` subprocess, BCI on/off, the teacher data, the students' grid and
budgets), each stage's outputs exist, the report's tables and commands are written, and a second
invocation reuses every stage (no command runs). Fast: the pilot's task rule and the equal-size
subsampling on synthetic files."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_driver():
    spec = importlib.util.spec_from_file_location("behaviors_smollm2", REPO / "bench" / "behaviors_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory, smollm2_dir):
    driver = load_driver()
    root = tmp_path_factory.mktemp("behaviors-smollm2")
    runs, out = root / "runs", root / "report"
    argv = ["--quick", "--runs", str(runs), "--out", str(out), "--model", str(smollm2_dir)]
    assert driver.main(argv) == 0
    return driver, runs, out, argv


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_runs_every_stage_and_reports(quick):
    driver, runs, out, _ = quick
    d = runs / driver.QUICK.prefix
    for name in ("pilot-samples.jsonl", "extract.json", "handbook.jsonl", "teacher-plain.json", "teacher-bci.json",
                 "teacher-plain.jsonl", "teacher-bci.jsonl", "train-sft.jsonl", "train-bcsft.jsonl", "student-data.json"):
        assert (d / name).exists(), name
    for seed in (None,) + driver.QUICK.sampled_seeds:
        for bci in (False, True):
            rows = driver.read_jsonl(d / f"b1-{'bci' if bci else 'plain'}-"
                                     f"{'greedy' if seed is None else f'sampled-s{seed}'}.jsonl")
            assert len(rows) == driver.QUICK.test
    pilot = driver.read_jsonl(d / "pilot-samples.jsonl")
    assert len(pilot) == 3 * driver.QUICK.pilot
    ex = json.loads((d / "extract.json").read_text())
    # every example's extraction was parsed: its lines counted (a JSON answer may hold several behaviors a line)
    assert ex["examples_done"] == driver.QUICK.train and ex["returned_lines"] >= 1
    assert ex["parsed"] + ex["rejected"] >= 1
    assert ex["behaviors_in_handbook"] == len(driver.read_jsonl(d / "handbook.jsonl"))
    # the strategist and the teacher were the served model: a real server on the port they were sent to
    record = json.loads(out.with_suffix(".json").read_text())
    serve = [c for c in record["executed"] if c.startswith("metareason serve ")]
    assert len(serve) == 1
    port = re.search(r"--port (\d+)", serve[0]).group(1)
    log = (d / "serve.log").read_text()
    assert f"on http://127.0.0.1:{port}/v1" in log and "[serve] stopped" in log  # started, then stopped
    for cmd in [c for c in record["executed"] if " extract " in c or " bcsft " in c]:
        assert f"base_url=http://127.0.0.1:{port}/v1" in cmd
    used = json.loads((d / "student-data.json").read_text())["used"]
    assert len(driver.read_jsonl(d / "train-sft.jsonl")) == len(driver.read_jsonl(d / "train-bcsft.jsonl")) == used
    for arm in driver.ARMS:
        assert set(record["grid"][arm]["validation"]) == set(driver.QUICK.lr_grid)
        lr = record["grid"][arm]["lr"]
        for seed in driver.QUICK.seeds:
            for budget in driver.QUICK.budgets:
                run = runs / f"{driver.QUICK.prefix}-{arm}-s{seed}-lr{lr}-{budget}"
                assert len(driver.read_jsonl(run / "eval_samples-test.jsonl")) == driver.QUICK.test
    for lr in driver.QUICK.lr_grid:  # the grid's runs were evaluated on the val questions
        val = runs / f"{driver.QUICK.prefix}-sft-s0-lr{lr}-{driver.QUICK.budgets[-1]}" / "eval_samples.jsonl"
        assert len(driver.read_jsonl(val)) == driver.QUICK.val
    md = out.with_suffix(".md").read_text()
    for heading in ("## Pilot", "## Strategist extraction", "## B1: BCI", "## B2: teacher data",
                    "## B2: learning rate", "## B2: students", "**B1 verdict**", "**B2 verdict**", "## Commands"):
        assert heading in md, heading
    for command in ("metareason eval configs/behaviors/smollm2/pilot.yaml", "metareason serve ",
                    "metareason behaviors extract configs/behaviors/smollm2/experiment.yaml",
                    "behaviors.bci.enabled=true", "--data-only --mode plain", "--data-only --mode bci",
                    "metareason run configs/behaviors/smollm2/experiment.yaml"):
        assert command in md, command
    assert len(record["b2"]["comparisons"]) == len(driver.QUICK.budgets)
    assert set(record["holm"]) == {f"B2-{b}" for b in driver.QUICK.budgets} | {"B1"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_invocation_reuses_every_stage(quick):
    driver, runs, out, argv = quick
    assert driver.main(argv) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["executed"] == []  # no command ran, no server started
    assert all(line.endswith("# reused") for line in record["commands"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_arm_reuses_its_students_and_writes_no_report(quick, tmp_path, capsys):
    """``--arms bcsft``: a second driver can train one arm beside the first; it runs only that arm's
    stages (here all finished) and leaves the report to a last run with both arms."""
    driver, runs, _, argv = quick
    out = tmp_path / "one-arm"
    assert driver.main(argv[:-4] + ["--runs", str(runs), "--out", str(out), "--stages", "students",
                                    "--arms", "bcsft", "--model", argv[-1]]) == 0
    err = capsys.readouterr().err
    assert "student bcsft" in err and "student sft" not in err
    assert "finished earlier, reused" in err and ": running" not in err
    assert not out.with_suffix(".md").exists()
    with pytest.raises(SystemExit):
        driver.main(argv + ["--arms", "nope"])
    assert "--arms: unknown arm 'nope'" in capsys.readouterr().err


def test_cuts_follow_the_designs_order():
    driver = load_driver()
    full = driver.FULL
    assert driver.with_cuts(full, 0) == full
    one = driver.with_cuts(full, 1)
    assert one.sampled_seeds == () and one.budgets == full.budgets and one.lr_grid == full.lr_grid
    two = driver.with_cuts(full, 2)
    assert two.budgets == (30, 60) and two.lr_grid == full.lr_grid
    three = driver.with_cuts(full, 3)
    assert three.lr_grid == ("3e-4", "1e-3") and three.seeds == full.seeds


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_b1_without_sampled_seeds_decides_on_the_greedy_pair(tmp_path):
    """Cut 1 drops the sampled seeds: B1's verdict then rests on the greedy McNemar and tokens."""
    driver = load_driver()
    plan = driver.Plan(driver.with_cuts(driver.FULL, 1), tmp_path, None)
    plan.dir.mkdir(parents=True)

    def rows(right, tokens):
        return [{"id": f"q{i}", "group": "reasoning_gym/gcd/gcd", "completion": "x", "score": float(i < right),
                 "gen_tokens": tokens} for i in range(40)]

    write_jsonl(plan.dir / "b1-plain-greedy.jsonl", rows(20, 100))
    write_jsonl(plan.dir / "b1-bci-greedy.jsonl", rows(20, 70))
    b1 = driver.analyse_b1(plan)
    assert b1["sampled_difference"] is None and len(b1["table"]) == 2
    assert b1["verdict"] == "supported"  # same answers right, 30% fewer tokens
    write_jsonl(plan.dir / "b1-bci-greedy.jsonl", rows(5, 70))
    assert driver.analyse_b1(plan)["verdict"].startswith("refuted (accuracy")


def test_pilot_rule_first_task_in_range_else_fallback(tmp_path):
    driver = load_driver()
    specs = [{"task": "reasoning_gym/basic_arithmetic", "params": {"min_terms": 3}},
             {"task": "reasoning_gym/chain_sum"}, {"task": "reasoning_gym/gcd"}]

    def samples(scores):
        rows = []
        for name, got in scores.items():
            rows += [{"group": f"reasoning_gym/{name}/{name}", "score": s, "gen_tokens": 10, "answer": "7",
                      "completion": "so 3 + 4 = 7" if s >= 1.0 else "answer: 8"} for s in got]
        write_jsonl(tmp_path / "p.jsonl", rows)
        return tmp_path / "p.jsonl"

    # basic_arithmetic too easy, chain_sum in range (0.01: reasoning-gym's credit for a wrong answer, not exact)
    got = driver.choose_task(samples({"basic_arithmetic": [1.0] * 9 + [0.0], "chain_sum": [1.0, 0.01, 0.01, 0.0],
                                      "gcd": [1.0, 0.0]}), specs)
    assert got["chosen"] == "chain_sum" and got["params"] == {} and got["rule"] == "in range"
    assert [t["accuracy"] for t in got["tasks"]] == [0.9, 0.25, 0.5]
    assert [t["last_number"] for t in got["tasks"]] == [0.9, 0.25, 0.5]  # the diagnostic: the last integer
    assert [t["ends_with_answer"] for t in got["tasks"]] == [0.1, 0.75, 0.5]
    got = driver.choose_task(samples({"basic_arithmetic": [0.0] * 4, "chain_sum": [1.0] * 4, "gcd": [0.01] * 4}), specs)
    assert got["chosen"] == "basic_arithmetic" and got["params"] == {"min_terms": 3} and "no candidate" in got["rule"]


def test_subsample_to_the_smaller_set(tmp_path):
    driver = load_driver()
    plan = driver.Plan(driver.QUICK, tmp_path, None)
    plan.dir.mkdir(parents=True)
    write_jsonl(plan.dir / "teacher-plain.jsonl", [{"id": str(i), "teacher_completion_tokens": 100} for i in range(9)])
    write_jsonl(plan.dir / "teacher-bci.jsonl", [{"id": str(i), "teacher_completion_tokens": 60} for i in range(4)])
    got = driver.subsample(plan)
    assert got["used"] == 4 and got["sft"]["kept"] == 9 and got["bcsft"]["kept"] == 4
    sft = driver.read_jsonl(plan.dir / "train-sft.jsonl")
    assert len(sft) == 4 and len({r["id"] for r in sft}) == 4
    assert [int(r["id"]) for r in sft] == sorted(int(r["id"]) for r in sft)  # order kept
    assert [r["id"] for r in driver.read_jsonl(plan.dir / "train-bcsft.jsonl")] == ["0", "1", "2", "3"]


def test_an_empty_handbook_runs_b1_and_says_why_b2_is_not_run(tmp_path, capsys):
    """The strategist may parse no behavior at all (a 135M model rarely writes the format): then
    BCI retrieves nothing and B2's two students would see the same answers, so the driver reuses
    B1, skips the teacher and students with the reason, and the report states it."""
    driver = load_driver()
    d = tmp_path / "runs" / driver.FULL.prefix
    d.mkdir(parents=True)
    pilot = [{"id": f"{t}/{i}", "group": f"reasoning_gym/{t}/{t}", "completion": "7", "answer": "7",
              "score": float(t == "gcd" and i < 2), "gen_tokens": 5} for t in ("basic_arithmetic", "chain_sum", "gcd")
             for i in range(10)]
    write_jsonl(d / "pilot-samples.jsonl", pilot)
    (d / "extract.json").write_text(json.dumps({"examples": 400, "examples_done": 400, "returned_lines": 900,
                                                "parsed": 0, "rejected": 900, "inserted": 0, "merged": 0,
                                                "behaviors_in_handbook": 0, "failures": [],
                                                "rejected_samples": []}))
    same = [{"id": f"q{i}", "group": "reasoning_gym/gcd/gcd", "completion": f"c{i}", "score": float(i < 3),
             "gen_tokens": 50} for i in range(20)]
    for name in ("b1-plain-greedy", "b1-bci-greedy"):
        write_jsonl(d / f"{name}.jsonl", same)
    out = tmp_path / "report"
    no_model = tmp_path / "no-model"  # a stage that needed the model would fail at once, not run for minutes
    no_model.mkdir()
    assert driver.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--stages", "extract,bci,teacher,students",
                        "--cuts", "1", "--model", str(no_model)]) == 0
    err = capsys.readouterr().err
    assert "teacher (plain): not run: the strategist's extraction left the handbook empty" in err
    assert "student sft seed 0 lr 1e-4 60 steps (grid): not run" in err and ": running" not in err
    assert not (d / "teacher-plain.json").exists()
    md = out.with_suffix(".md").read_text()
    assert "Chosen: gcd" in md and "Cuts applied" in md and "the sampled BCI seeds" in md
    assert "Greedy completions identical with BCI on and off: 20 of 20 (the handbook is empty" in md
    assert "Not run: the strategist's extraction left the handbook empty" in md
    assert json.loads(out.with_suffix(".json").read_text())["b2"]["not_run"].startswith("not run")
