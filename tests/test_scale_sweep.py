"""``metareason sweep`` through the real CLI on a local Ray runtime (Ray Tune): a 4-trial grid
gives one report (table + plots); the trial that fails while running is reported with its error
and the other three complete; a resumed sweep does not run finished trials again; bad grids are
one-line errors before anything starts."""
import json

import pytest
import yaml

from metareason.scale.sweep import parse_grid, trial_overrides
from tests.conftest import TINY_LLAMA, run_cli

pytest.importorskip("ray")


def write_config(tmp_path):
    cfg = {"name": "base", "plugins": [], "quiet": True,
           "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
           "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 16,
                                                  "params": {"levels": [1], "split": "train"}}]},
           "eval": {"at_end": False},
           "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "lr": 3e-3}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grid_combinations_and_bad_grids():
    grid = parse_grid(["train.lr=1e-3,3e-3", "train.batch_size=2,4"])
    assert trial_overrides(grid) == [["train.lr=1e-3", "train.batch_size=2"], ["train.lr=1e-3", "train.batch_size=4"],
                                     ["train.lr=3e-3", "train.batch_size=2"], ["train.lr=3e-3", "train.batch_size=4"]]
    for bad in (["train.lr"], ["train.lr="], ["train.lr=1,,2"]):
        with pytest.raises(Exception, match="--grid"):
            parse_grid(bad)


def test_an_invalid_trial_config_is_a_one_line_error(tmp_path):
    res = run_cli("sweep", str(write_config(tmp_path)), "--grid", "train.lr=1e-3,-1", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "trial 1: train.lr=-1" in err[0] and "train.lr" in err[0], res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_four_trial_sweep_reports_the_failed_trial_and_completes_the_others(tmp_path):
    config, out = write_config(tmp_path), tmp_path / "sweep"
    # batch 64 > 16 examples: valid config, fails when the trial builds its data
    args = ("sweep", str(config), "--grid", "train.batch_size=2,4,8,64", "--out", str(out), "--name", "bs",
            "--cpus-per-trial", "1")
    res = run_cli(*args, "--ray", "local")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "1 of 4 trials failed: bs-t03" in res.stderr
    data = json.loads((out / "bs.json").read_text())
    trials = {t["trial"]: t for t in data["trials"]}
    assert sorted(trials) == [0, 1, 2, 3] and data["failed"] == [3]
    assert "fewer than one batch of 64" in trials[3]["error"]
    for i in (0, 1, 2):
        t = trials[i]
        assert t["ok"] and len(t["loss_curve"]) == 3 and t["final_train_loss"] > 0
        cfg = yaml.safe_load((out / "runs" / t["run_name"] / "config.yaml").read_text())
        assert cfg["train"]["batch_size"] == [2, 4, 8][i]  # the grid value reached the run
    md = (out / "bs.md").read_text()
    assert "| bs-t03 | 64 | FAILED |" in md and md.count("| ok |") == 3 and "## Failed trials" in md
    for png in ("loss", "final"):
        assert (out / f"bs-{png}.png").stat().st_size > 1000 and f"bs-{png}.png" in md

    # resume: the finished trials are kept (not trained again), the failed one stays failed
    stamps = {i: (out / "runs" / trials[i]["run_name"] / "metrics.jsonl").stat().st_mtime_ns for i in (0, 1, 2)}
    res = run_cli(*args, "--resume")
    assert res.returncode == 1, res.stderr[-3000:]
    again = json.loads((out / "bs.json").read_text())
    assert again["failed"] == [3] and [t["final_train_loss"] for t in again["trials"][:3]] == \
        [trials[i]["final_train_loss"] for i in (0, 1, 2)]
    assert stamps == {i: (out / "runs" / trials[i]["run_name"] / "metrics.jsonl").stat().st_mtime_ns for i in (0, 1, 2)}
