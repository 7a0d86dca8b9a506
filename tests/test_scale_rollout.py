"""GRPO rollout actors on a 3-node loopback Ray cluster (``ray.cluster_utils.Cluster``: a head
without CPUs + two 1-CPU nodes, one actor each): a run with 2 actors equals the single-process
run on the same seeds; a node removed in the middle of a step is survived (its shard is
re-issued to the other actor, the run still equals the reference); a restarted actor re-fetches
the current weights before generating; the step fails with a clear error when no actor is left."""
import json
import os

import pytest
import torch

from metareason import Kernel, hookimpl
from metareason.scale.rollout import LocalSampler, RolloutError, RolloutPool, group_seed
from metareason.train.grpo import train_grpo
from tests.conftest import TINY_LLAMA
from tests.test_grpo import Rewards

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

TOL = 1e-5  # per-step reward mean and loss: the same tokens are sampled; only float summation order differs


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    small = dict(object_store_memory=80_000_000)
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **small))
    nodes = [c.add_node(num_cpus=1, **small) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def config(tmp_path, name, **scale):
    return {"name": name, "output_dir": str(tmp_path), "plugins": [], "quiet": True,
            "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
            "data": {"train": [{"task": "causal_loop", "num_samples": 16, "params": {"levels": [1]}}]},
            "train": {"algorithm": "grpo", "max_steps": 3, "batch_size": 4, "lr": 3e-3, "log_every": 1,
                      "schedule": "constant", "seed": 5},
            "rl": {"num_generations": 4, "rewards": {"frac_digits": 1.0}, "max_completion_length": 8},
            "eval": {"at_end": False},
            "scale": dict({"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "max_restarts": 0,
                           "get_timeout_s": 120}, **scale)}


def kernel(cfg, *plugins):
    k = Kernel(cfg)
    k.register(Rewards(), name="test_rewards")
    for i, p in enumerate(plugins):
        k.register(p, name=f"p{i}")
    return k


def curve(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["rl/reward/mean"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run: the same per-group seeded sampling, in this process."""
    tmp = tmp_path_factory.mktemp("ref")
    k = kernel(config(tmp, "ref"))
    train_grpo(k, sampler=LocalSampler(k))
    return curve(tmp / "ref")


def assert_same(got, want):
    assert len(got) == len(want) == 3
    for (r1, l1), (r2, l2) in zip(got, want):
        assert abs(r1 - r2) < TOL and abs(l1 - l2) < TOL, (got, want)
    assert len({r for r, _ in want}) > 1  # the rewards change over the run: a real comparison


def test_two_rollout_actors_equal_the_single_process_run(cluster, reference, tmp_path):
    k = kernel(config(tmp_path, "two"))
    with RolloutPool(k) as pool:
        train_grpo(k, sampler=pool)
        infos = [ray.get(a.info.remote(), timeout=60) for a in pool.actors]
    assert_same(curve(tmp_path / "two"), reference)
    assert len({i["node_id"] for i in infos}) == 2  # one actor per worker node
    assert [i["fetches"] for i in infos] == [3, 3] and [i["version"] for i in infos] == [2, 2]
    assert pool.reissued == 0


def test_a_node_removed_mid_step_is_survived(cluster, reference, tmp_path):
    c, nodes = cluster
    pool_box = {}

    class RemoveNodeInStep2:
        """At the first prompt of step 2 (before its shards go out) the node of actor 1 goes away."""

        calls = 0

        @hookimpl
        def metareason_transform_prompt(self, prompt):
            self.calls += 1
            if self.calls == 5:  # batch_size 4: the first prompt of the second step
                node_id = ray.get(pool_box["pool"].actors[1].info.remote(), timeout=60)["node_id"]
                victim = next(n for n in nodes if n.node_id == node_id)
                c.remove_node(victim)
            return None

    k = kernel(config(tmp_path, "node"), RemoveNodeInStep2())
    with RolloutPool(k) as pool:
        pool_box["pool"] = pool
        train_grpo(k, sampler=pool)
        assert pool.reissued >= 1 and pool.alive == [0]
    assert_same(curve(tmp_path / "node"), reference)  # the re-issued shard gave the same completions
    nodes[:] = [n for n in nodes if n in c.worker_nodes] + [c.add_node(num_cpus=1, object_store_memory=80_000_000)]
    c.wait_for_nodes()


def test_a_restarted_actor_refetches_the_current_weights(cluster, tmp_path):
    k = kernel(config(tmp_path, "restart", num_workers=1, max_restarts=1, placement_strategy="PACK"))
    model, tok = k.load()
    prompts = ["A=1;B=A+1;B=?", "A=2;B=A*3;B=?"]
    with RolloutPool(k) as pool:
        pool(model, tok, prompts, version=0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        want = [g.token_ids for g in LocalSampler(k)(model, tok, prompts, version=1)]
        assert [g.token_ids for g in pool(model, tok, prompts, version=1)] == want
        ray.kill(pool.actors[0], no_restart=False)  # Ray restarts it with the initial weights
        got = [g.token_ids for g in pool(model, tok, prompts, version=1)]  # the same version again
        info = ray.get(pool.actors[0].info.remote(), timeout=60)
    assert got == want
    assert info["version"] == 1 and info["fetches"] == 1  # the restarted process fetched once


def test_the_step_fails_clearly_when_no_actor_is_left(cluster, tmp_path):
    k = kernel(config(tmp_path, "dead", num_workers=1, placement_strategy="PACK"))
    model, tok = k.load()
    with RolloutPool(k) as pool:
        ray.kill(pool.actors[0], no_restart=True)
        with pytest.raises(RolloutError, match="no rollout worker is left"):
            pool(model, tok, ["A=1;B=A+1;B=?"], version=0)


def test_group_seeds_depend_on_step_and_prompt_only():
    seeds = {group_seed(5, v, i) for v in range(3) for i in range(4)}
    assert len(seeds) == 12 and group_seed(5, 1, 2) == group_seed(5, 1, 2)
