"""The issue 28 part A driver (bench/behaviors_method.py) in miniature (``--quick``): every stage
runs and the report's tables are written; a second invocation reuses every stage (no command
runs, no checkpoint is rewritten); a run whose final checkpoint is gone is trained again from
scratch, its stale evaluation copies replaced; a base below the gate is trained again with doubled steps
(a run of its own) and the arms start from it; a driver on a subset of the arms reuses the bases and never
trains one. Fast: the verdict rules and the per-answer measures."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]


def load_driver():
    spec = importlib.util.spec_from_file_location("behaviors_method", REPO / "bench" / "behaviors_method.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def checkpoint_times(runs: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in runs.glob("*/checkpoints/*/*") if p.is_file()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    driver = load_driver()
    root = tmp_path_factory.mktemp("behaviors-method")
    runs, out = root / "runs", root / "report"
    argv = ["--quick", "--runs", str(runs), "--out", str(out)]
    assert driver.main(argv) == 0
    return driver, runs, out, argv


@pytest.mark.slow
def test_quick_writes_every_table(quick):
    driver, runs, out, _ = quick
    md = out.with_suffix(".md").read_text()
    for heading in ("## Bases", "## Training data", "## Learning rate", "## Test results",
                    "## The nine comparisons", "## Verdicts", "## Commands"):
        assert heading in md
    record = json.loads(out.with_suffix(".json").read_text())
    assert list(record["comparisons"]) == [c[0] for c in driver.COMPARISONS]
    nine = {k: c for k, c in record["comparisons"].items() if c["test"] != "context"}
    assert len(nine) == 9
    # Holm over the nine: every adjusted p at least its raw p; the context comparison outside it
    assert all(c["p_holm"] >= c["p"] for c in nine.values())
    assert record["comparisons"]["A4-control-vs-none"]["p_holm"] is None
    # sft, bcsft: 3 budgets x 2 topic groups; bci: 3 budgets x 6 conditions (4 held-out, 2 training)
    rows = {(r["arm"], r["budget"], r["condition"], r["topics"]) for r in record["table"]}
    assert len(rows) == 2 * 6 + 18
    assert {("bci", 4, c, "heldout") for c in ("none", "ordered", "shuffled", "control")} <= rows
    assert set(record["grid"]) == {"sft", "bcsft", "bci"}
    assert all(d["teacher_accuracy"] == 1.0 for d in record["data"].values())
    # every training run and test evaluation ran: 2 bases, 3 arms x 2 lr (grid), 3 arms x 5 other
    # runs (2 seeds x 3 budgets, less seed 0's top budget), 3 arms x 6 test evaluations
    executed = record["executed"]
    assert sum(c.startswith("metareason run") for c in executed) == 2 + 6 + 15
    assert sum(c.startswith("metareason eval") for c in executed) == 18
    # the documented commands are in the report, in the doc's form
    assert "metareason run configs/behaviors/method/pretrain.yaml name=behaviors-methodq-base-s0" in md
    assert "metareason run configs/behaviors/method/student.yaml name=behaviors-methodq-bci-s1-lr" in md
    # each seed's top budget got a test evaluation at the chosen lr
    for arm, g in record["grid"].items():
        for seed in (0, 1):
            assert (runs / f"behaviors-methodq-{arm}-s{seed}-lr{g['lr']}-4" / "eval_samples-test.jsonl").exists()


@pytest.mark.slow
def test_second_invocation_reuses_every_stage(quick, tmp_path):
    driver, runs, out, argv = quick
    before = checkpoint_times(runs)
    assert before
    again = tmp_path / "again"
    assert driver.main(argv[:-1] + [str(again)]) == 0
    record = json.loads(again.with_suffix(".json").read_text())
    assert record["executed"] == []
    assert checkpoint_times(runs) == before
    first = json.loads(out.with_suffix(".json").read_text())
    assert record["table"] == first["table"] and record["comparisons"] == first["comparisons"]
    assert all(c.endswith("# reused") for c in record["commands"] if c.startswith("metareason"))


@pytest.mark.slow
def test_interrupted_run_restarts_cleanly(quick, tmp_path):
    """A run without its final checkpoint (interrupted) is trained afresh (--overwrite) and its
    evaluations redone; a trained run whose validation copy is missing is evaluated again on its
    own eval set (not retrained); nothing else runs."""
    driver, runs, out, argv = quick
    lr = json.loads(out.with_suffix(".json").read_text())["grid"]["bcsft"]["lr"]
    run = runs / f"behaviors-methodq-bcsft-s1-lr{lr}-3"
    import shutil

    shutil.rmtree(run / "checkpoints")
    (run / "eval_samples-test.jsonl").write_text("stale\n")
    evaluated = runs / f"behaviors-methodq-bcsft-s1-lr{lr}-2"
    (evaluated / "eval_samples-val.jsonl").unlink()
    again = tmp_path / "again"
    assert driver.main(argv[:-1] + [str(again)]) == 0
    executed = json.loads(again.with_suffix(".json").read_text())["executed"]
    assert len(executed) == 3, executed
    assert executed[0] == f"metareason eval {evaluated} output_dir={runs} " + " ".join(driver.QUICK.extra)
    assert run.name in executed[1] and executed[1].startswith("metareason run") and executed[1].endswith("--overwrite")
    assert run.name in executed[2] and executed[2].startswith("metareason eval") and "data.eval=" in executed[2]
    assert (evaluated / "eval_samples-val.jsonl").exists()
    assert (run / "checkpoints" / "step-0000003").is_dir()
    assert (run / "eval_samples-test.jsonl").read_text() != "stale\n"


@pytest.mark.slow
def test_gate_doubles_a_failing_base_once_and_the_arms_start_from_it(quick, tmp_path, capsys):
    """Below the gate, the design's one change: the base's steps doubled once, a run of its own
    (``-x2``), trained only by a driver that may train bases; the arms' commands then start from
    the doubled base's final checkpoint, and the report says what happened."""
    driver, runs, out, argv = quick
    subset = argv[:-1] + [str(tmp_path / "subset"), "--gate", "0.9", "--arms", "bci"]
    with pytest.raises(SystemExit) as stop:
        driver.main(subset)
    message = str(stop.value.code)
    assert "seed 0" in message and "--bases-only" in message and "behaviors-methodq-base-s0-x2" in message
    assert not (runs / "behaviors-methodq-base-s0-x2").exists()
    assert driver.main(argv[:-1] + [str(tmp_path / "bases"), "--gate", "0.9", "--bases-only"]) == 0
    steps = 2 * driver.QUICK.base_steps
    for seed in (0, 1):
        assert (runs / f"behaviors-methodq-base-s{seed}-x2" / "checkpoints" / f"step-{steps:07d}").is_dir()
    err = capsys.readouterr().err
    assert "doubled once (12)" in err and "'doubled': True" in err
    plan = driver.Plan(driver.QUICK, runs, doubled={0})
    argv0 = plan.student_argv("bci", 0, "2e-3", 4)
    assert f"model.path={runs / 'behaviors-methodq-base-s0-x2' / 'checkpoints' / f'step-{steps:07d}'}" in argv0
    assert f"train.max_steps={steps}" in plan.base_argv(0) and "name=behaviors-methodq-base-s0-x2" in plan.base_argv(0)
    # a second --bases-only run reuses the doubled bases
    assert driver.main(argv[:-1] + [str(tmp_path / "bases2"), "--gate", "0.9", "--bases-only"]) == 0
    assert "doubled once" not in capsys.readouterr().err


@pytest.mark.slow
def test_partial_arms_reuse_the_bases_and_never_train_one(quick, tmp_path):
    driver, runs, out, _ = quick
    partial = tmp_path / "bci"
    assert driver.main(["--quick", "--runs", str(runs), "--out", str(partial), "--arms", "bci"]) == 0
    record = json.loads(partial.with_suffix(".json").read_text())
    assert record["executed"] == [] and list(record["comparisons"]) == ["A3", "A4-accuracy", "A4-tokens", "A5",
                                                                        "A4-control-vs-none"]
    assert "a partial report" in partial.with_suffix(".md").read_text()
    with pytest.raises(SystemExit) as stop:  # no base yet: a driver on a subset of the arms refuses to train it
        driver.main(["--quick", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x"), "--arms", "bci"])
    assert "--bases-only first" in str(stop.value.code)
    assert not (tmp_path / "empty" / "behaviors-methodq-base-s0" / "checkpoints").exists()


def comparison(only_a, only_b, p, diff_high, tokens_a, tokens_b, wilcoxon_p=1.0):
    return {"mcnemar": {"only_a": only_a, "only_b": only_b, "p_value": p},
            "accuracy_difference": {"mean": diff_high - 0.01, "low": diff_high - 0.02, "high": diff_high},
            "token_change": tokens_a / tokens_b - 1.0,
            "wilcoxon": {"mean_a": tokens_a, "mean_b": tokens_b, "p_value": wilcoxon_p}}


def test_verdicts_follow_the_design_rules():
    """A1 / A3: supported needs accuracy not lower and >= 30% fewer tokens; refuted needs the
    other side significantly more accurate. A4: the control block must bring the tokens back."""
    driver = load_driver()
    sizes = driver.QUICK
    cmp = {"A1-heldout": comparison(30, 10, 0.001, 0.05, 60.0, 100.0),   # more accurate, 40% shorter
           "A1-train": comparison(5, 40, 1e-6, -0.1, 60.0, 100.0),      # sft significantly better
           "A3": comparison(10, 12, 0.8, 0.02, 80.0, 100.0)}            # only 20% shorter
    v = driver.verdicts(cmp, [], sizes)
    assert v["A1-heldout"].startswith("supported") and "stronger claim" in v["A1-heldout"]
    assert v["A1-train"].startswith("refuted")
    assert v["A3"] == "neither"
    row = {"arm": "bci", "budget": sizes.budgets[-1], "topics": "heldout", "condition": "control",
           "cites_absent": 0.0, "cites_control": 0.0}
    same = {"A4-tokens": comparison(0, 0, 1.0, 0.0, 100.0, 99.0, wilcoxon_p=0.6),
            "A4-control-vs-none": comparison(3, 4, 1.0, 0.0, 100.0, 100.0)}
    assert driver.verdicts(same, [row], sizes)["A4"].startswith("refuted (the control block shortens")
    back = dict(same, **{"A4-tokens": comparison(0, 0, 1.0, 0.0, 200.0, 100.0, wilcoxon_p=1e-9)})
    assert driver.verdicts(back, [row], sizes)["A4"] == "supported"
    assert driver.verdicts(back, [dict(row, cites_absent=0.2)], sizes)["A4"].startswith("refuted (under the control")


def test_answer_measures_on_the_teachers_answers():
    """Per-step correctness and the citation measures, read off the exact teacher's answers under
    each block (the teacher cites only the task behaviors its block holds, in the chain's order)."""
    from metareason.plugins.behaviors.demo_task import make_task

    driver = load_driver()

    def measures(block):
        task = make_task({"format": "method", "split": "test", "topics": ["flip", "churn"], "block": block}, 99, 20)
        return [driver.sample_measures({"id": ex["id"], "prompt": ex["prompt"], "completion": ex["completion"]})
                for ex in task.examples]

    ordered, shuffled, control, none = (measures(b) for b in ("ordered", "shuffled", "control", "none"))
    assert all(m["steps"] == 1.0 for ms in (ordered, shuffled, control, none) for m in ms)
    assert all(m["cites"] and m["chain_order"] and m["block_order"] and not m["cites_absent"] for m in ordered)
    assert all(m["chain_order"] and not m["block_order"] for m in shuffled)  # the block's order is not the chain's
    assert all(not m["cites"] and not m["cites_control"] for m in control + none)
    # a wrong step and a behavior the block does not hold are seen
    ex = make_task({"format": "method", "split": "test", "topics": ["flip"], "block": "control"}, 99, 1).examples[0]
    first = re.search(r"-> (\d+)\.", ex["completion"])  # the first step's result, off by one
    wrong = ex["completion"].replace(first.group(0), f"-> {int(first.group(1)) + 1}.", 1)
    m = driver.sample_measures({"id": ex["id"], "prompt": ex["prompt"], "completion": wrong})
    assert m["steps"] == 0.5 and not m["cites_absent"]
    cited = ex["completion"].replace(": double each digit from the right and add the carry of the digit before:",
                                     ": behavior_dbl:", 1)
    m = driver.sample_measures({"id": ex["id"], "prompt": ex["prompt"], "completion": cited})
    assert m["steps"] == 1.0 and m["cites_absent"] and not m["cites_control"]
