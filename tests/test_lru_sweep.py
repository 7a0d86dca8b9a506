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
                     "train": [{"task": "causal_loop", "num_samples": 16, "params": {"levels": list(levels), "split": "train"}}],
                     "eval": [{"task": "causal_loop", "num_samples": 8, "seed": 5, "params": {"levels": [1, 2, 3, 4], "split": "test"}}]},
            "train": {"max_steps": 50, "batch_size": 4, "log_every": 1, "lr": 1e-3},
            "generation": {"max_new_tokens": 4, "batch_size": 8}}


def write_configs(root, groups):
    root.mkdir()
    for name, (group, arch) in groups.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(tiny_config(name, group, arch)))
    return root


@pytest.mark.slow
def test_sweep_with_ray_writes_the_report(tmp_path):
    configs = write_configs(tmp_path / "configs", GROUPS)
    out, runs = tmp_path / "report", tmp_path / "runs"
    res = run_cli("lru", "sweep", str(configs), "--out", str(out), "--runs-dir", str(runs), "--steps", "2",
                  "--ray", "train.batch_size=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Ray tasks" in res.stderr
    data = json.loads((out / "lru-sweep.json").read_text())
    assert data["launcher"] == "ray" and "--steps 2" in data["command"]
    groups = {g["group"]: g for g in data["groups"]}
    assert sorted(groups) == ["A", "B", "C", "D"]
    levels = ["level_1", "level_2", "level_3", "level_4"]
    for g in groups.values():
        assert g["ok"] and g["max_steps"] == 2 and g["batch_size"] == 2  # --steps and overrides reached the runs
        assert sorted(k for k in g["accuracy"] if k != "all") == levels
        assert g["num_parameters"] > 0 and g["tokens_per_s"] > 0 and len(g["loss_curve"]) == 2
        assert sorted(g["majority_baseline"]) == ["all"] + levels
    assert groups["A"]["lru"] == {} and groups["B"]["lru"] == {}
    for name in ("C", "D"):
        assert sorted(k for k in groups[name]["lru"] if k != "all") == levels
        assert set(groups[name]["final_loss_terms"]) == {"L_pred", "L_stability", "L_sparsity", "L_ponder"}
    assert all(groups["C"]["lru"][lv]["iterations"] == 3 for lv in levels)  # fixed mode
    assert all(1 <= groups["D"]["lru"][lv]["iterations"] <= 3 for lv in levels)
    claims = [h["claim"] for h in data["hypotheses"]]
    assert claims == ["D's mean iterations rise with level", "D beats A on level_2", "D beats A on level_4"]
    md = (out / "lru-sweep.md").read_text()
    for needle in ("## Accuracy per level", "*majority answer*", "## LRU statistics per level", "## Hypotheses",
                   "| D |", "--steps 2"):
        assert needle in md
    for png in ("accuracy", "iterations", "convergence", "loss"):
        assert (out / f"lru-sweep-{png}.png").stat().st_size > 1000
        assert f"lru-sweep-{png}.png" in md
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_sweep_reports_a_failed_group_and_exits_1(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    bad = tiny_config("bad", "A", GROUPS["a"][1])
    bad["data"]["train"][0]["params"]["chain_length"] = 99  # valid YAML, fails when the task is built
    (configs / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = tmp_path / "report"
    res = run_cli("lru", "sweep", str(configs), "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--no-ray")
    assert res.returncode == 1
    assert "groups failed: A" in res.stderr and "subprocesses" in res.stderr
    data = json.loads((out / "lru-sweep.json").read_text())
    assert data["groups"][0]["ok"] is False and "chain_length" in data["groups"][0]["error"]
    assert "## Failed groups" in (out / "lru-sweep.md").read_text()


def test_sweep_bad_input_is_one_line(tmp_path):
    res = run_cli("lru", "sweep", str(tmp_path / "missing"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'missing'}: not a directory of run configs"
    (tmp_path / "empty").mkdir()
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
    res = run_cli("lru", "sweep", str(tmp_path / "empty"), "--steps", "0")
    assert res.returncode == 2 and "--steps" in res.stderr


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
