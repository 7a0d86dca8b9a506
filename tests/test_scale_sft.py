"""Data-parallel SFT on a real local Ray runtime (Ray Train TorchTrainer, 2 workers on gloo):
the loss curve equals single-process training with the same global batch, and a worker killed
mid-run is restarted by Ray Train and the run resumes from the last kernel checkpoint."""
import json
import os

import pytest
import torch

from metareason import Kernel
from metareason.scale.dist import LOCAL, shard_batch
from tests.conftest import TINY_LLAMA

ray = pytest.importorskip("ray")

TOL = 1e-4  # |delta loss| per step: float summation order differs between 1 and 2 processes


def sft_config(tmp_path, name, **train):
    return {"name": name, "output_dir": str(tmp_path / "runs"), "quiet": True, "plugins": [],
            "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
            "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 32,
                                                   "params": {"levels": [1, 2], "split": "train"}}]},
            "eval": {"at_end": False},
            "train": dict({"max_steps": 4, "batch_size": 4, "grad_accum": 2, "log_every": 1, "lr": 3e-3,
                           "save_every": 2, "seed": 3}, **train),
            "scale": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 1}}


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def ray_runtime():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80_000_000, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_shards_are_the_rows_rank_mod_world_of_the_global_batch():
    batch = {"input_ids": torch.arange(10).view(5, 2), "examples": list("abcde"), "epoch": 3}
    a, b = shard_batch(batch, 0, 2), shard_batch(batch, 1, 2)
    assert a["examples"] == ["a", "c", "e"] and b["examples"] == ["b", "d"] and a["epoch"] == 3
    assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]).sum(0), batch["input_ids"].sum(0))
    assert LOCAL.shard(batch) is batch


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    Kernel(sft_config(tmp, "single")).run()
    return losses(tmp / "runs" / "single"), tokens_seen(tmp / "runs" / "single")


def tokens_seen(run_dir):
    state = run_dir / "checkpoints" / "step-0000004" / "trainer_state.json"
    return json.loads(state.read_text())["tokens_seen"]


@pytest.mark.slow
def test_two_gloo_workers_follow_the_single_process_loss_curve(ray_runtime, single_process, tmp_path):
    from metareason.scale.launch import run_on_ray

    kernel = Kernel(sft_config(tmp_path, "dp"))
    run_on_ray(kernel, "local")
    run_dir = tmp_path / "runs" / "dp"
    dp = losses(run_dir)
    assert sorted(dp) == [1, 2, 3, 4]
    for step, loss in single_process[0].items():
        assert abs(dp[step] - loss) < TOL, (step, dp[step], loss)
    # the workers together saw each global batch once (each its rows rank::2), not twice
    assert tokens_seen(run_dir) == single_process[1]
    assert (run_dir / "report.md").exists()


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_runtime, single_process, tmp_path, monkeypatch):
    from metareason.scale.launch import run_on_ray

    marker = tmp_path / "killed"
    monkeypatch.setenv("METAREASON_SCALE_KILL", f"1:2:{marker}")  # rank 1 dies after checkpoint 2
    kernel = Kernel(sft_config(tmp_path, "dp-kill"))
    run_on_ray(kernel, "local")
    run_dir = tmp_path / "runs" / "dp-kill"
    assert marker.read_text().startswith("rank 1 killed at step 2")
    dp = losses(run_dir)
    assert sorted(dp) == [1, 2, 3, 4]  # steps 3-4 after the restart, logged once
    for step, loss in single_process[0].items():
        assert abs(dp[step] - loss) < TOL, (step, dp[step], loss)
    state = json.loads((run_dir / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # the restarted workers resumed from checkpoint 2 (written before the kill), not from scratch
    ckpt2 = run_dir / "checkpoints" / "step-0000002" / "trainer_state.json"
    assert ckpt2.stat().st_mtime_ns < marker.stat().st_mtime_ns
