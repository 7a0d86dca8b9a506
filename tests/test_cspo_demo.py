"""The demonstration's configs validate, and `metareason cspo demo` chains its stages end to end
(tiny sizes: the real configs with fewer samples and steps) and writes the report."""
import json

import pytest
import yaml

from metareason import Kernel
from metareason.plugins.cspo.demo import FILES
from tests.conftest import REPO, run_cli

CONFIGS = REPO / "configs" / "cspo"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_configs_validate(name):
    kernel = Kernel(CONFIGS / name, overrides=["plugins=[cspo]"])
    cfg = kernel.config
    assert cfg.cspo.enabled
    for reward in cfg.rl.rewards:
        assert reward in kernel.rewards
    for spec in cfg.data.train + cfg.data.eval:
        assert spec.task in kernel.tasks


def test_demo_configs_chain():
    cfg = {k: Kernel(CONFIGS / v, overrides=["plugins=[cspo]"]).config for k, v in FILES.items()}
    assert cfg["takeover"].cspo.output == cfg["control"].data.train[0].params["path"]
    assert cfg["takeover"].cspo.TRIGGER_TOKENS == ["<control>"]
    assert cfg["cspo"].train.algorithm == "grpo" and cfg["cspo"].cspo.mask_rl_loss
    assert set(cfg["cspo"].rl.rewards) == {"cspo_correct", "cspo_structure", "cspo_length"}
    evals = {k: [s.model_dump() for s in c.data.eval] for k, c in cfg.items() if c.data.eval}
    assert len({json.dumps(v, sort_keys=True) for v in evals.values()}) == 1  # same held-out problems


def _shrink(raw: dict, name: str) -> dict:
    raw["data"]["train"][0]["num_samples"] = 64 if name != "takeover" else 8
    for spec in raw["data"].get("eval", []):
        spec["num_samples"] = 6
    raw.setdefault("generation", {}).update(max_new_tokens=24, batch_size=16)
    raw.setdefault("train", {}).update(max_steps=2, batch_size=4, log_every=1)
    raw["cspo"]["keep_incorrect"] = True
    if "rl" in raw:
        raw["rl"].update(num_generations=2, max_completion_length=16)
    return raw


@pytest.mark.slow
def test_demo_driver_runs_every_stage(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in FILES.values():
        raw = yaml.safe_load((CONFIGS / name).read_text())
        (folder / name).write_text(yaml.safe_dump(_shrink(raw, name.split("_")[-1].split(".")[0])))
    res = run_cli("cspo", "demo", str(folder), "--out", str(tmp_path / "demo"), "--quiet", cwd=tmp_path,
                  env={"METAREASON_PLUGINS": "cspo", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "demo.json").read_text())
    assert set(record["results"]) == {"sft", "control", "cspo", "nomask"}
    for r in record["results"].values():
        assert 0 <= r["accuracy"] <= 1 and r["gen_tokens"] > 0 and "sampled" in r
    assert record["takeover"]["prompts"] == 8
    assert (tmp_path / "runs" / "cspo-cl-takeover" / "takeover.jsonl").exists()
    assert record["cspo_training"]["last"]["steps"][-1] == 2
    md = (tmp_path / "demo.md").read_text()
    assert "SFT without control" in md and "after CSPO" in md and record["command"] in md
