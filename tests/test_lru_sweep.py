"""lru plugin, the experiment: ``metareason lru sweep`` through the real CLI (Ray tasks and plain
subprocesses), the report files, failures, ``metareason lru stats``, bad input."""
import json

import pytest
import yaml

from tests.conftest import run_cli

MLA = dict(model_type="deepseek_mla", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, kv_latent_dim=8, q_latent_dim=12, rope_head_dim=4, max_position_embeddings=256)
GROUPS = {
    "a": ("A", dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)),
    "b": ("B", dict(MLA, use_lru=False)),
    "c": ("C", dict(MLA, use_lru=True, lru_max_iterations=3, lru_fixed_iterations=True)),
    "d": ("D", dict(MLA, use_lru=True, lru_max_iterations=3)),
}


def tiny_config(name, group, arch, levels=(1, 2, 3, 4)):
    return {"name": f"sweep-{name}", "plugins": ["lru"], "quiet": True,
            "lru": {"group": group, "description": f"tiny {group}", "stats_batch_size": 4},
            "model": {"arch": arch, "tokenizer": {"type": "char"}},
            "data": {"max_length": 256,
                     "train": [{"task": "causal_loop", "num_samples": 16,
                                "params": {"levels": list(levels), "split": "train", "val_fraction": 0.1}}],
                     "eval": [{"task": "causal_loop", "num_samples": 8, "seed": 5,
                               "params": {"levels": [1, 2, 3, 4], "split": "test", "val_fraction": 0.1}}]},
            "train": {"max_steps": 50, "batch_size": 4, "log_every": 1, "lr": 1e-3},
            "generation": {"max_new_tokens": 4, "batch_size": 8}}


def write_configs(root, groups):
    root.mkdir()
    for name, (group, arch) in groups.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(tiny_config(name, group, arch)))
    return root


LEVELS = ["level_1", "level_2", "level_3", "level_4"]


@pytest.mark.slow
def test_quick_sweep_with_ray_runs_the_protocol_and_resumes(tmp_path):
    """Groups A (no LRU) and D (ACT): the grid on validation, the second seed, the test split."""
    configs = write_configs(tmp_path / "configs", {k: GROUPS[k] for k in ("a", "d")})
    out, runs = tmp_path / "report", tmp_path / "runs"
    args = ("lru", "sweep", str(configs), "--out", str(out), "--runs-dir", str(runs), "--quick", "--steps", "2",
            "--val-samples", "4", "--test-samples", "8")
    res = run_cli(*args, "--ray", "train.batch_size=2", timeout=1100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Ray tasks" in res.stderr and "lr grid 0.002, 0.004 on seed 0, seeds [0, 1]" in res.stderr
    data = json.loads((out / "lru-sweep.json").read_text())
    assert data["launcher"] == "ray" and data["quick"] and "--quick" in data["command"]
    trials = data["trials"]
    # grid: 2 groups x 2 rates on seed 0; then seed 1 at each group's chosen rate
    assert len(trials) == 2 * 2 + 2 and all(t["ok"] for t in trials)
    assert all(t["max_steps"] == 2 and t["batch_size"] == 2 for t in trials)  # --steps and overrides reached the runs
    groups = {g["group"]: g for g in data["groups"]}
    assert sorted(groups) == ["A", "D"]
    for g in groups.values():
        grid = {r["lr"]: r for r in g["grid"]}
        assert sorted(grid) == [0.002, 0.004] and all(r["val_accuracy"] is not None for r in grid.values())
        best = max(grid.values(), key=lambda r: (r["val_accuracy"], -r["val_loss"]))
        assert g["chosen_lr"] == best["lr"]  # chosen on validation, never on test
        assert g["seeds"] == [0, 1]
        assert sorted(k for k in g["accuracy"] if k != "all") == LEVELS and g["accuracy"]["all"]["n"] == 2
        assert g["num_parameters"] > 0 and g["forward_flops_per_token"] > 0
    seed1 = [t for t in trials if t["seed"] == 1]
    assert {(t["group"], t["lr"]) for t in seed1} == {(k, g["chosen_lr"]) for k, g in groups.items()}
    for t in trials:  # the test split is evaluated only for the runs at the chosen rate
        assert bool(t["test"]) == (t["lr"] == groups[t["group"]]["chosen_lr"])
        assert t["validation"]["eval_entry"]["params"]["split"] == "validation"
        assert t["validation"]["host"]["cpu"] and t["validation"]["host"]["cpus"] >= 1  # where it ran
    assert groups["A"]["lru"] == {} and groups["A"]["spearman_per_seed"] == []
    assert all(1 <= groups["D"]["lru"]["iterations"][lv]["mean"] <= 3 for lv in LEVELS)
    assert len(groups["D"]["spearman_per_seed"]) == 2
    assert groups["A"]["hosts"] == groups["D"]["hosts"] and len(groups["A"]["hosts"]) == 1
    assert groups["D"]["forward_flops_per_token"] > groups["A"]["forward_flops_per_token"] * 0.5
    md = (out / "lru-sweep.md").read_text()
    for needle in ("**Quick mode**", "## Protocol", "## Learning-rate grid", "## Test accuracy per level",
                   "*majority answer*", "## LRU statistics per level", "Spearman", "## Accuracy and compute",
                   "## Hypotheses", "| D |"):
        assert needle in md
    for png in ("accuracy", "iterations", "convergence", "loss"):
        assert (out / f"lru-sweep-{png}.png").stat().st_size > 1000
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind
    # the same command again: every trial is reused, nothing retrains
    res = run_cli(*args, "--no-ray", "train.batch_size=2", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(": resumed") == 6 and ": ok" not in res.stderr
    # a changed override is a different trial: it runs again; --results-dir keeps its results
    kept = tmp_path / "kept"
    one = (*args, "--no-ray", "--groups", "A", "--lrs", "2e-3", "--seeds", "1", "--results-dir", str(kept),
           "train.batch_size=2", "train.weight_decay=0.5")
    res = run_cli(*one, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ": resumed" not in res.stderr and res.stderr.count(": ok") == 1
    first = json.loads((out / "lru-sweep.json").read_text())["groups"][0]
    assert not list((kept / "sweep-a-lr0.002-s0").glob("checkpoints"))
    # a fresh runs directory (another machine): the kept results are reused, nothing retrains
    import shutil

    shutil.rmtree(runs)
    res = run_cli(*one, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(": resumed") == 1 and ": ok" not in res.stderr
    again = json.loads((out / "lru-sweep.json").read_text())["groups"][0]
    assert again["accuracy"] == first["accuracy"] and again["grid"] == first["grid"]


def test_sweep_reports_a_failed_trial_and_exits_1(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    bad = tiny_config("bad", "A", GROUPS["a"][1])
    bad["data"]["train"][0]["params"]["chain_length"] = 99  # valid YAML, fails when the task is built
    (configs / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "report"
    res = run_cli("lru", "sweep", str(configs), "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--no-ray",
                  "--lrs", "1e-3", "--seeds", "1")
    assert res.returncode == 1
    assert "trials failed: A" in res.stderr and "subprocesses" in res.stderr
    data = json.loads((out / "lru-sweep.json").read_text())
    assert data["trials"][0]["ok"] is False and "chain_length" in data["trials"][0]["error"]
    assert data["groups"][0]["chosen_lr"] is None
    assert "## Failed trials" in (out / "lru-sweep.md").read_text()


def test_sweep_bad_input_is_one_line(tmp_path):
    res = run_cli("lru", "sweep", str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'missing'}: not a directory of run configs"
    (tmp_path / "empty").mkdir()
    res = run_cli("lru", "sweep", str(tmp_path / "empty"), "--keep-weights")
    assert res.returncode == 2 and res.stderr.strip() == "error: --keep-weights: needs --results-dir (the weights are kept there)"
    res = run_cli("lru", "sweep", str(tmp_path / "empty"))
    assert res.returncode == 2 and "no *.yaml run configs" in res.stderr
    configs = write_configs(tmp_path / "dup", {"x": GROUPS["a"], "y": GROUPS["b"]})
    cfg = yaml.safe_load((configs / "y.yaml").read_text())
    cfg["lru"]["group"] = "A"
    (configs / "y.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("lru", "sweep", str(configs))
    assert res.returncode == 2 and "lru.group 'A' is also used by" in res.stderr
    cfg["lru"]["group"], cfg["train"]["lrr"] = "B", 1
    (configs / "y.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("lru", "sweep", str(configs))
    assert res.returncode == 2 and res.stderr.strip().endswith("y.yaml: train.lrr: unknown field")
    del cfg["train"]["lrr"]
    cfg["train"]["batch_size"] = 8  # a different token budget
    (configs / "y.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("lru", "sweep", str(configs))
    assert res.returncode == 2 and "y.yaml: train.batch_size differs from" in res.stderr
    cfg["train"]["batch_size"] = 4
    del cfg["data"]["train"][0]["params"]["val_fraction"]
    (configs / "y.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("lru", "sweep", str(configs))
    assert res.returncode == 2 and "data.train[0].params.val_fraction" in res.stderr
    cfg["data"]["train"][0]["params"]["val_fraction"] = 0.1
    (configs / "y.yaml").write_text(yaml.safe_dump(cfg))
    for flag, value, needle in (("--steps", "0", "--steps"), ("--lrs", "fast", "--lrs"), ("--lrs", "-1", "--lrs"),
                                ("--seeds", "0", "--seeds"), ("--seeds", "1,1", "--seeds"), ("--groups", "Z", "--groups"),
                                ("--extend", "-1", "--extend")):
        res = run_cli("lru", "sweep", str(tmp_path / "dup"), flag, value)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_the_committed_group_configs_share_one_budget():
    """configs/lru/ passes the sweep's up-front checks (same budget, a validation split)."""
    from pathlib import Path

    from metareason.plugins.lru.sweep import read_specs

    specs = read_specs(str(Path(__file__).resolve().parents[1] / "configs" / "lru"), "runs/x", [])
    assert [s.group for s in specs] == sorted(s.group for s in specs) and {"A", "B", "C", "D"} <= {s.group for s in specs}
    assert len({json.dumps(s.budget, sort_keys=True) for s in specs}) == 1


def test_rank_correlation_flatness_and_spread():
    from metareason.plugins.lru.sweep_report import flatness, spearman, spread

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.8944, abs=1e-4)  # ties: average ranks
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    curve = [[i, 1.0] for i in range(20)]
    assert flatness(curve) == pytest.approx(0.0)
    falling = [[i, 1.0 - 0.04 * i] for i in range(20)]
    assert flatness(falling) == pytest.approx((0.46 - 0.30) / 0.46)  # steps 12-15 against 16-19
    assert flatness(falling, absolute=True) == pytest.approx(0.16)
    st = spread([0.5, 0.7, float("nan"), None])
    assert st["mean"] == pytest.approx(0.6) and st["min"] == 0.5 and st["max"] == 0.7 and st["n"] == 2


def test_stats_of_a_run_without_lru(tmp_path):
    configs = write_configs(tmp_path / "configs", {"a": GROUPS["a"]})
    res = run_cli("run", str(configs / "a.yaml"), f"output_dir={tmp_path}", "train.max_steps=1", "eval.at_end=false")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("lru", "stats", str(tmp_path / "sweep-a"))
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "sweep-a" / "lru_stats.json").read_text())
    assert stats["model_type"] == "llama" and stats["levels"] == {} and stats["num_parameters"] > 0
    res = run_cli("lru", "stats", str(tmp_path))
    assert res.returncode == 2 and "not a run directory" in res.stderr


@pytest.mark.parametrize("peak,extend,expect_tried,expect_chosen", [
    (2.5e-4, 3, [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3], 2.5e-4),  # grows down until the best is inside
    (2.5e-4, 1, [5e-4, 1e-3, 2e-3, 4e-3], 5e-4),  # stops after --extend steps, still at the edge
    (1e-2, 2, [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], 8e-3),  # grows up, past the peak: bracketed
    (2e-3, 2, [1e-3, 2e-3, 4e-3], 2e-3),  # inside the grid: nothing more
    (2.5e-4, 0, [1e-3, 2e-3, 4e-3], 1e-3),  # --extend 0: the grid as given
])
def test_grid_grows_past_the_edge_its_best_rate_sits_on(tmp_path, monkeypatch, peak, extend, expect_tried,
                                                        expect_chosen):
    """Validation accuracy peaks at ``peak``; the sweep keeps the runs it asked for (no training here)."""
    import math
    from pathlib import Path

    from metareason.plugins.lru import sweep, sweep_report

    def fake_task(payload):
        fn, trial, plan, env = payload
        if fn == "run_trial":
            Path(trial["run_dir"]).mkdir(parents=True, exist_ok=True)
            score = 1.0 - abs(math.log2(trial["lr"] / peak)) / 10
            (Path(trial["run_dir"]) / "sweep-validation.json").write_text(
                json.dumps({"accuracy": {"all": score}, "loss": {"all": 1.0}}))
            (Path(plan["results_dir"]) / trial["name"] / sweep.KEPT_WEIGHTS).mkdir(parents=True)  # --keep-weights
        return {"ok": True, "resumed": False, "train_wall_s": 1.0, "eval_wall_s": 1.0, "error": None}

    got = {}
    monkeypatch.setattr(sweep, "_trial_task", fake_task)
    monkeypatch.setattr(sweep_report, "write_report",
                        lambda specs, results, chosen, *a, **k: got.update(chosen=chosen) or tmp_path / "r.md")
    configs = write_configs(tmp_path / "configs", {"a": GROUPS["a"]})
    kept = tmp_path / "kept"
    plan = sweep.Plan(lrs=[1e-3, 2e-3, 4e-3], seeds=[0, 1], extend=extend, results_dir=str(kept), keep_weights=True)
    _, results, _ = sweep.run_sweep(str(configs), str(tmp_path / "out"), str(tmp_path / "runs"), "x", [], plan,
                                    use_ray=False)
    tried = sorted(r.trial.lr for r in results if r.trial.seed == 0)
    assert tried == pytest.approx(expect_tried)
    assert got["chosen"]["A"] == pytest.approx(expect_chosen)
    assert [r.trial.lr for r in results if r.trial.seed == 1] == [got["chosen"]["A"]]
    # kept weights stay only for the runs at the chosen rate (the ones the test split evaluates)
    with_weights = sorted(r.trial.lr for r in results if (kept / r.trial.name / sweep.KEPT_WEIGHTS).exists())
    assert with_weights == pytest.approx([got["chosen"]["A"]] * 2)


def test_report_names_the_machines_when_trials_ran_on_more_than_one():
    from metareason.plugins.lru.sweep_report import _hosts_line

    same = [{"group": "A", "hosts": ["cpu x"]}, {"group": "B", "hosts": ["cpu x"]}]
    assert _hosts_line(same) == []  # one machine: the header line says it
    mixed = same + [{"group": "C", "hosts": ["cpu y"]}, {"group": "D", "hosts": ["not recorded"]}]
    (line, _) = _hosts_line(mixed)
    assert line.endswith("A, B: cpu x; C: cpu y; D: not recorded.")


def test_equal_compute_reading_settles_only_a_costlier_group_that_loses():
    from metareason.plugins.lru.sweep_report import equal_compute

    def g(name, flops, acc):
        return {"group": name, "forward_flops_per_token": flops, "accuracy": {"all": {"mean": acc}}}

    a, b, c, d = g("A", 1.0e6, 0.87), g("B", 1.005e6, 0.86), g("C", 1.5e6, 0.90), g("D", 1.2e6, 0.80)
    groups = [a, b, c, d]
    assert equal_compute(a, groups) == "–" and equal_compute(b, groups) == "–"  # within 1%: the same compute
    assert equal_compute(d, groups) == "not ahead of A, B on more compute: unchanged at equal compute"
    assert equal_compute(c, groups) == ("ahead of A on 1.50× its compute, B on 1.49× its compute, D on 1.25× its "
                                        "compute: open until those train as long")
    e = g("E", 1.6e6, 0.85)  # ahead of D, behind A and B
    assert equal_compute(e, groups + [e]) == ("not ahead of A, B, C on more compute: unchanged at equal compute; "
                                              "ahead of D on 1.33× its compute: open until those train as long")


def test_keep_weights_carries_a_trial_to_its_test_evaluation_on_a_fresh_machine(tmp_path):
    """--keep-weights: the final weights (not the optimizer state) travel with the kept results
    until the test evaluation is done, so a restored trial can still be evaluated on test."""
    import shutil

    from metareason.plugins.lru import sweep

    run_dir, kept = tmp_path / "runs" / "t-lr0.001-s0", tmp_path / "kept"
    ckpt = run_dir / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng.pt"):
        (ckpt / name).write_text(name)
    (run_dir / sweep.TRIAL_FILE).write_text(json.dumps({"fingerprint": "f", "train_wall_s": 1, "eval_wall_s": 1}))
    (run_dir / "sweep-validation.json").write_text("{}")
    trial = {"name": run_dir.name, "run_dir": str(run_dir), "fingerprint": "f"}
    plan = {"results_dir": str(kept), "keep_weights": True}

    sweep.keep_results(trial, {**plan, "keep_weights": False})
    assert not (kept / run_dir.name / sweep.KEPT_WEIGHTS).exists()  # off by default: results only
    sweep.keep_results(trial, plan)
    weights = kept / run_dir.name / sweep.KEPT_WEIGHTS / "step-3"
    assert sorted(p.name for p in weights.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]

    shutil.rmtree(tmp_path / "runs")  # a fresh machine
    assert sweep.restore_results(trial, plan)
    assert (ckpt / "model.safetensors").read_text() == "model.safetensors" and not (ckpt / "optimizer.pt").exists()

    (run_dir / "sweep-test.json").write_text("{}")  # the test evaluation is done: the weights are dropped
    sweep.keep_results(trial, plan)
    assert not (kept / run_dir.name / sweep.KEPT_WEIGHTS).exists()
    assert (kept / run_dir.name / "sweep-test.json").exists()
