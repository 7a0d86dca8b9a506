"""memory_reason, issue 29: the experiment's statistics (bootstrap interval over questions, paired
sign-flip test, exact McNemar, Holm) and the new configs (they parse; the arms differ only where
the design says)."""
import json
from pathlib import Path

import numpy as np
import pytest

from metareason import Kernel
from metareason.config import read_yaml
from metareason.plugins.memory_reason.stats import (bootstrap_ci, compare, correctness, holm, mcnemar_exact,
                                                    sign_flip_p)

ROOT = Path(__file__).resolve().parent.parent


def test_mcnemar_exact_on_hand_counts():
    a = np.array([1] * 8 + [0] * 2 + [1] * 5)
    b = np.array([0] * 8 + [0] * 2 + [1] * 5)
    assert mcnemar_exact(a, b) == (8, 0, pytest.approx(2 / 256))
    assert mcnemar_exact(a, a)[2] == 1.0
    assert mcnemar_exact(np.array([1, 0]), np.array([0, 1])) == (1, 1, 1.0)


def test_sign_flip_and_bootstrap():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 400)) < 0.6).astype(float)
    assert sign_flip_p(a, a) == 1.0
    better = np.maximum(a, (rng.random((3, 400)) < 0.3))  # a plus some extra right answers
    assert sign_flip_p(better, a) < 0.001
    lo, hi = bootstrap_ci(a)
    assert lo < a.mean() < hi and hi - lo < 0.1
    res = compare(better, a)
    assert res["diff"] > 0 and res["ci"][0] > 0 and res["seeds_same_sign"] == 3 and len(res["mcnemar"]) == 3
    with pytest.raises(ValueError, match="shape"):
        compare(a, a[:, :10])


def test_holm_step_down():
    assert holm({"h1": 0.01, "h2": 0.03, "h3": 0.04}) == {"h1": True, "h2": False, "h3": False}
    assert holm({"h1": 0.01, "h2": 0.02, "h3": 0.04}) == {"h1": True, "h2": True, "h3": True}


def test_correctness_reads_runs_paired_by_question_id(tmp_path):
    for seed, scores in enumerate(([1, 0, 1], [0, 0, 1])):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        rows = [{"id": f"q{i}", "score": s} for i, s in reversed(list(enumerate(scores)))]
        (d / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, ids = correctness([tmp_path / "s0", tmp_path / "s1"])
    assert ids == ["q0", "q1", "q2"] and m.tolist() == [[1, 0, 1], [0, 0, 1]]
    (tmp_path / "s1" / "eval_samples.jsonl").write_text(json.dumps({"id": "q9", "score": 1}) + "\n")
    with pytest.raises(ValueError, match="differ"):
        correctness([tmp_path / "s0", tmp_path / "s1"])


ARMS = ("plain", "tokens_full", "filler", "plain_lora", "tokens_lora_pt")


@pytest.mark.parametrize("path", sorted((ROOT / "configs/memory_reason/varied").glob("*.yaml"))
                         + sorted(p for p in (ROOT / "configs/memory_reason/smollm2").glob("*.yaml")
                                  if p.name != "experiment.yaml"), ids=lambda p: p.name)
def test_new_configs_parse(path):
    Kernel(path)


def test_arms_share_data_steps_and_schedule_and_lora_targets():
    raw = {a: read_yaml(ROOT / f"configs/memory_reason/varied/{a}.yaml") for a in ARMS}
    for a in ARMS:
        assert raw[a]["data"] == raw["plain"]["data"]
        assert {k: v for k, v in raw[a]["train"].items() if k != "lr"} == \
            {k: v for k, v in raw["plain"]["train"].items() if k != "lr"}
    assert raw["plain_lora"]["model"]["lora"] == raw["tokens_lora_pt"]["model"]["lora"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(raw["plain_lora"]["model"]["lora"]["target_modules"])
    assert raw["filler"]["memory_reason"] == dict(raw["tokens_full"]["memory_reason"], filler=True)
    smol = {a: read_yaml(ROOT / f"configs/memory_reason/smollm2/{a}.yaml") for a in ("plain_lora", "tokens_lora_pt")}
    assert smol["plain_lora"]["model"] == smol["tokens_lora_pt"]["model"]
    assert smol["plain_lora"]["data"] == smol["tokens_lora_pt"]["data"]
    assert smol["tokens_lora_pt"]["memory_reason"]["first_prefix"] == "completion"


def test_lr_is_chosen_by_validation_accuracy_ties_to_the_smaller():
    from metareason.plugins.memory_reason.experiment import choose_lr

    res = {"0.003": {"val_accuracy": 0.5}, "0.0003": {"val_accuracy": 0.4}, "0.001": {"val_accuracy": 0.6}}
    assert choose_lr(res) == "0.001"
    res["0.003"]["val_accuracy"] = 0.6
    assert choose_lr(res) == "0.001"
    res["0.0003"]["val_accuracy"] = 0.6
    assert choose_lr(res) == "0.0003"


@pytest.mark.slow
def test_experiment_quick_runs_every_stage_and_reports_paired_tests(tmp_path):
    """The issue-29 driver end to end with 2 steps per run: a base per seed (exported, gates
    recorded), the lr grid on validation, held-out runs (seed 0 re-evaluates the grid run), the
    report with per-structure accuracy, fine attribution and the paired H1/H2 tests; a second call
    resumes without training again."""
    from metareason.plugins.memory_reason.experiment import run_experiment

    kw = dict(config_dir=ROOT / "configs/memory_reason/varied", output_dir=tmp_path / "runs", seeds=(0, 1),
              arms=("tokens_full", "filler"), out=str(tmp_path / "res"), quiet=True, quick=True,
              n_val=3, n_heldout=9, grid=(1e-3,))
    rec = run_experiment(**kw)
    state = json.loads((tmp_path / "runs/experiment.json").read_text())
    assert set(state["bases"]) == {"0", "1"}
    assert all(Path(b["hf"], "config.json").exists() for b in state["bases"].values())
    assert state["chosen"] == {"tokens_full": "0.001", "filler": "0.001"}
    assert state["heldout"]["filler|0"]["run_dir"] == state["grid"]["filler"]["0.001"]["run_dir"]
    val_ids = {json.loads(x)["id"] for x in Path(state["grid"]["filler"]["0.001"]["run_dir"],
                                                 "eval_samples_val.jsonl").read_text().splitlines()}
    from metareason.plugins.memory_reason.tasks import make_world_task

    world = {"kind": "varied", "entities": 16, "attributes": 3, "world_seed": 0}
    all_val = {e["id"] for e in make_world_task(dict(world, split="val"), 1, 10**4).examples}
    assert len(val_ids) == 3 and val_ids <= all_val
    recall_rows = Path(state["heldout"]["filler|1"]["run_dir"], "eval_samples_recall.jsonl").read_text().splitlines()
    assert len(recall_rows) == 48 and 0 <= state["heldout"]["filler|1"]["recall"] <= 1
    assert "fact recall" in (tmp_path / "res.md").read_text()
    assert rec["n_questions"] == 9 and set(rec["tests"]) == {"H2"}
    assert len(rec["arms"]["filler"]["per_seed"]) == 2 and len(rec["arms"]["filler"]["by_structure"]) == 9
    assert "H2: tokens_full vs filler" in (tmp_path / "res.md").read_text()
    mtime = Path(state["heldout"]["filler|1"]["run_dir"], "eval_samples.jsonl").stat().st_mtime
    run_experiment(**kw)  # resumes: nothing trained or evaluated again
    assert Path(state["heldout"]["filler|1"]["run_dir"], "eval_samples.jsonl").stat().st_mtime == mtime


def test_experiment_settings_come_from_the_config_folder(tmp_path):
    """experiment.yaml in the config folder replaces the design's defaults, command-line values win,
    an unknown setting is a one-line error naming the file; the real-model folder's settings name
    configs that exist and parse."""
    from metareason.api import UserError
    from metareason.plugins.memory_reason.experiment import SETTINGS, Experiment, read_settings

    assert read_settings(tmp_path) == SETTINGS
    smol = ROOT / "configs/memory_reason/smollm2"
    exp = Experiment(smol, tmp_path / "runs", seeds=(0, 1, 2))
    assert exp.arms == ("plain_lora", "tokens_lora_pt") and exp.settings["shared_base"] and exp.settings["merge_base"]
    assert exp.grid == {"plain_lora": (2e-4, 5e-4), "tokens_lora_pt": (2e-4, 5e-4)}
    assert (exp.n_val, exp.n_heldout) == (150, 200)
    for name in [exp.settings["base"], *(f"{a}.yaml" for a in exp.arms)]:
        Kernel(smol / name)
    exp = Experiment(smol, tmp_path / "runs", seeds=(0,), arms=("plain_lora",), n_heldout=50, grid=(1e-3,))
    assert (exp.arms, exp.n_heldout, exp.grid) == (("plain_lora",), 50, {"plain_lora": (1e-3,)})
    (tmp_path / "experiment.yaml").write_text("shared_bsae: true\n")
    with pytest.raises(UserError, match=r"experiment.yaml: shared_bsae: unknown setting"):
        read_settings(tmp_path)


@pytest.mark.slow
def test_experiment_with_one_shared_base_and_no_arithmetic_gate(tmp_path):
    """The real-model part's shape on the tiny model (2 steps per run): one base for every seed,
    from the config the settings name, exported merged, no arithmetic gate; every seed's arm runs
    start from that base."""
    import shutil

    import yaml

    from metareason.plugins.memory_reason.experiment import run_experiment

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "configs/memory_reason/varied", conf)
    (conf / "base.yaml").rename(conf / "facts.yaml")
    (conf / "base_arith.yaml").unlink()
    (conf / "experiment.yaml").write_text(yaml.safe_dump(
        {"title": "a shared base", "base": "facts.yaml", "base_arith": None, "shared_base": True, "merge_base": True,
         "recall_gate": 0.5, "arms": ["tokens_full"], "grid": {"tokens_full": [1e-3]}, "n_val": 3, "n_heldout": 6}))
    rec = run_experiment(config_dir=conf, output_dir=tmp_path / "runs", seeds=(0, 1), out=str(tmp_path / "res"),
                         quiet=True, quick=True)
    state = json.loads((tmp_path / "runs/experiment.json").read_text())
    assert list(state["bases"]) == ["0"] and state["bases"]["0"]["arithmetic"] is None
    hf = state["bases"]["0"]["hf"]
    for seed in (0, 1):
        run = Path(state["heldout"][f"tokens_full|{seed}"]["run_dir"])
        assert read_yaml(run / "config.yaml")["model"]["path"] == hf
    assert rec["n_questions"] == 6 and len(rec["arms"]["tokens_full"]["per_seed"]) == 2
    md = (tmp_path / "res.md").read_text()
    assert md.startswith("# memory_reason, issue 29: a shared base") and "one base shared by every seed" in md
    assert "arithmetic" not in md.split("Bases:")[1].splitlines()[0]


def test_h4_counts_wrong_answers_whose_first_wrong_step_is_a_wrong_entity_or_value(tmp_path, monkeypatch):
    """H4 from the report: per question and seed, wrong with an entity or value error first; the
    plain arm here recalls a wrong value (seed 0) or a wrong entity (seed 1) on half the questions
    and adds a wrong step after right facts on the other half; the token arm is always right."""
    import re

    from metareason.plugins.memory_reason.experiment import report_record
    from metareason.plugins.memory_reason.tasks import make_world_task

    n = 20
    gold = make_world_task({"kind": "varied", "split": "heldout", "entities": 16, "attributes": 3, "world_seed": 0},
                           1, n).examples
    state = {"bases": {"0": {"hf": str(tmp_path / "base-s0/hf"), "recall": 1.0}}, "chosen": {}, "grid": {}, "heldout": {}}
    monkeypatch.chdir(tmp_path)

    def write(arm, seed, make):
        run = tmp_path / f"{arm}-s{seed}"
        run.mkdir()
        rows = [dict(zip(("completion", "score"), make(k, e)), id=e["id"], answer=e["answer"])
                for k, e in enumerate(gold)]
        (run / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        state["heldout"][f"{arm}|{seed}"] = {"run_dir": str(run), "lr": "0.001", "recall": 1.0}

    def text(steps, answer):
        return "\n".join(s["text"] for s in steps) + f"\nThe answer is: {answer}"

    def wrong(seed):
        def make(k, e):
            steps = [dict(s) for s in e["cot_steps"]]
            if k % 2 == 0:  # the first fact: a wrong value (seed 0) or another person (seed 1)
                m = next(s for s in steps if s["type"] == "memory")
                m["text"] = re.sub(r"\d+", "99", m["text"]) if seed == 0 else "Zed" + m["text"][m["text"].index(" "):]
            else:  # facts right, then a wrong operation or final answer
                steps.append({"type": "reason", "text": "1+1=3"})
            return text(steps, "-1"), 0.0
        return make

    for seed in (0, 1):
        write("plain", seed, wrong(seed))
        write("tokens_full", seed, lambda k, e: (text(e["cot_steps"], e["answer"]), 1.0))
    rec = report_record(state, ("plain", "tokens_full"), (0, 1), ROOT / "configs/memory_reason/varied", n)
    h4 = rec["h4"]["H4 (full)"]
    assert (h4["a"], h4["b"]) == ("tokens_full", "plain")
    assert h4["rate_a"] == 0.0 and h4["rate_b"] == pytest.approx(0.5)
    assert h4["diff"] == pytest.approx(-0.5) and h4["p_sign_flip"] < 0.01
    assert rec["arms"]["plain"]["error_entity"] == pytest.approx(0.25)
    assert rec["arms"]["plain"]["error_value"] == pytest.approx(0.25)
    # the record names paths relative to the working directory (it is committed)
    assert rec["bases"]["0"]["hf"] == "base-s0/hf" and rec["arms"]["plain"]["run_dirs"] == ["plain-s0", "plain-s1"]
    assert "H4 (full): tokens_full vs plain" in __import__(
        "metareason.plugins.memory_reason.experiment", fromlist=["markdown"]).markdown(rec)


@pytest.mark.slow
def test_an_interrupted_run_goes_on_from_its_checkpoint_and_a_changed_one_starts_again(tmp_path, kernel_run_calls):
    """The experiment's runs survive a stop between checkpoints: the same config resumes (the same
    losses as uninterrupted), a run dir of another config is overwritten."""
    import shutil

    from metareason.api import read_metrics
    from metareason.plugins.memory_reason.experiment import Experiment

    calls = kernel_run_calls
    exp = Experiment(ROOT / "configs/memory_reason/varied", tmp_path, seeds=(0,), quiet=True, quick=True)
    extra = ["train.max_steps=4", "train.save_every=2", "train.keep_last=5", "data.eval=[]"]
    _, run_dir = exp._run("base.yaml", "base-x", extra)
    first = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")  # stopped after step 2's checkpoint
    exp._run("base.yaml", "base-x", extra)
    assert calls == [False, True]
    assert {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r} == first
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")
    exp._run("base.yaml", "base-x", extra + ["train.lr=0.0123"])
    assert calls == [False, True, False]
