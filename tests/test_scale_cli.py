"""The ``scale:`` config section and ``metareason run CONFIG --ray``: defaults, one-line errors,
and a GRPO run through the CLI whose rollouts come from Ray actors."""
import json

import pytest
import yaml

from metareason.config import ConfigError, load_config
from metareason.scale.runtime import worker_resources
from tests.conftest import TINY_LLAMA, run_cli


def test_scale_defaults_and_resources():
    cfg, _ = load_config(data={"plugins": []})
    assert cfg.scale.num_workers == 1 and cfg.scale.placement_strategy == "PACK" and cfg.scale.max_failures == 0
    assert worker_resources(cfg.scale) == {"CPU": 1.0}
    cfg, _ = load_config(data={"plugins": [], "scale": {"use_gpu": True, "resources_per_worker": {"CPU": 4}}})
    assert worker_resources(cfg.scale) == {"CPU": 4.0, "GPU": 1.0}


@pytest.mark.parametrize("bad, field", [({"num_workers": 0}, "scale.num_workers"),
                                        ({"placement_strategy": "PILE"}, "scale.placement_strategy"),
                                        ({"workers": 2}, "scale.workers: unknown field")])
def test_scale_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        load_config(data={"plugins": [], "scale": bad})


def grpo_config(tmp_path):
    cfg = {"name": "g", "output_dir": str(tmp_path / "runs"), "plugins": [], "quiet": True,
           "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
           "data": {"train": [{"task": "causal_loop", "num_samples": 8, "params": {"levels": [1]}}]},
           "train": {"algorithm": "grpo", "max_steps": 2, "batch_size": 2, "log_every": 1},
           "rl": {"num_generations": 2, "rewards": {"causal_loop_exact": 1.0}, "max_completion_length": 4},
           "eval": {"at_end": False},
           "scale": {"num_workers": 2, "get_timeout_s": 300}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_batch_smaller_than_the_workers_is_an_error(tmp_path):
    from metareason import Kernel
    from metareason.errors import UserError
    from metareason.scale.train import run_sft_on_ray

    kernel = Kernel({"plugins": [], "train": {"batch_size": 2}, "scale": {"num_workers": 4}})
    with pytest.raises(UserError, match="train.batch_size: 2 rows cannot be split over scale.num_workers=4"):
        run_sft_on_ray(kernel)


@pytest.mark.slow
def test_grpo_run_with_ray_rollout_actors_through_the_cli(tmp_path):
    res = run_cli("run", str(grpo_config(tmp_path)), "--ray", "train.max_steps=2")  # an override after --ray
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 GRPO rollout actors" in res.stderr and "new local runtime" in res.stderr
    rows = [json.loads(l) for l in (tmp_path / "runs" / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert all(r["rl/completion_length/mean"] > 0 for r in rows if "train/loss" in r)


def test_an_address_without_a_cluster_is_a_one_line_error(tmp_path):
    res = run_cli("run", str(grpo_config(tmp_path)), "--ray", "127.0.0.1:1", timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ray 127.0.0.1:1: no Ray cluster answers there"), res.stderr


@pytest.mark.slow
def test_bench_scale_writes_its_record(tmp_path):
    out = tmp_path / "scale.json"
    res = run_cli("bench", "scale", "--actors", "1", "--steps", "1", "--prompts", "2", "--generations", "2",
                  "--max-tokens", "4", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [(r["mode"], r["actors"]) for r in record["rows"]] == [
        ("single process (kernel loop)", 0), ("single process, per-group seeded sampler (the actors' code)", 0),
        ("Ray rollout actors", 1)]
    assert all(r["completions_per_s"] > 0 and len(r["steps_s"]) == 1 for r in record["rows"])
    assert record["completions_per_step"] == 4 and record["weights_bytes"] > 0
    assert "| Ray rollout actors | 1 |" in out.with_suffix(".md").read_text()
