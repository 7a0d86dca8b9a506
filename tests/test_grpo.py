"""The GRPO loop end to end on a tiny Llama: learning a trivially learnable reward, exact resume
(also from the middle of a generation's iterations), the CLI and its metrics, reward call
conventions, the loss-mask hook in a run, no reference model at beta 0, config errors, and an
SFT checkpoint as the starting policy."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metareason import Kernel, hookimpl
from metareason.checkpoint import latest_checkpoint, list_checkpoints
from metareason.config import ConfigError
from metareason.plugin_manager import PluginError
from tests.conftest import TINY_LLAMA, run_cli

TARGET = "7"


def frac_target(completions, examples):
    return [c.count(TARGET) / max(len(c), 1) for c in completions]


def frac_digits(completions, examples):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class Rewards:
    """Registers the test rewards (a plugin object, as a real method plugin would)."""

    def __init__(self, seen=None):
        self.seen = seen if seen is not None else {}

    @hookimpl
    def metareason_register_rewards(self, register):
        seen = self.seen

        def with_extras(completions, examples, completion_ids, completion_lengths, truncated, tokenizer):
            seen.update(ids=completion_ids, lengths=completion_lengths, truncated=truncated, texts=completions,
                        tokenizer=tokenizer, examples=examples)
            return [0.0] * len(completions)

        def with_kwargs(completions, examples, **kwargs):
            seen["kwargs"] = sorted(kwargs)
            return [None] * len(completions)  # unscored: left out of the statistics

        register("frac_target", frac_target)
        register("frac_digits", frac_digits)
        register("with_extras", with_extras)
        register("with_kwargs", with_kwargs)


def tiny(tmp_path, name="g", rl=None, **train):
    return {
        "name": name, "output_dir": str(tmp_path), "plugins": [], "quiet": True,
        "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
        "data": {"train": [{"task": "causal_loop", "num_samples": 48, "params": {"levels": [1]}}],
                 "eval": [{"task": "causal_loop", "num_samples": 4, "seed": 9, "params": {"levels": [1]}}]},
        "train": dict({"algorithm": "grpo", "max_steps": 4, "batch_size": 2, "lr": 3e-3, "log_every": 1,
                       "save_every": 0, "schedule": "constant", "keep_last": 5}, **train),
        "rl": dict({"num_generations": 4, "rewards": {"frac_target": 1.0}, "max_completion_length": 10}, **(rl or {})),
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "eval": {"at_end": False},
    }


def kernel(cfg, *plugins):
    k = Kernel(cfg)
    k.register(Rewards(), name="test_rewards")
    for i, p in enumerate(plugins):
        k.register(p, name=f"p{i}")
    return k


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_goes_up_on_a_learnable_reward(tmp_path):
    k = kernel(tiny(tmp_path, "learn", max_steps=30, batch_size=4, lr=5e-3,
                    rl={"num_generations": 8, "max_completion_length": 16}))
    k.run()
    r = [row["rl/reward/mean"] for row in rows(k.config.run_dir) if "rl/reward/mean" in row]
    assert len(r) == 30
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > 3 * first and last > 0.05, (first, last)


def test_resume_equals_uninterrupted(tmp_path):
    """num_iterations 2 and save_every 3: the step-3 checkpoint sits between the two iterations of a
    generation, so resuming needs the saved rollout; beta > 0 adds the reference model."""
    rl = {"num_iterations": 2, "beta": 0.04, "loss_type": "grpo", "rewards": {"frac_digits": 1.0}}
    full = kernel(tiny(tmp_path, "full", rl=rl, max_steps=6, save_every=3, grad_accum=2))
    full.run()

    class StopAfter4:
        @hookimpl
        def metareason_on_step_end(self, step):
            if step == 4:
                raise RuntimeError("simulated interruption")

    part = kernel(tiny(tmp_path, "part", rl=rl, max_steps=6, save_every=3, grad_accum=2), StopAfter4())
    with pytest.raises(PluginError, match="simulated interruption"):
        part.run()
    ckpt = latest_checkpoint(part.config.run_dir)
    assert ckpt.name == "step-0000003" and (ckpt / "rollout.safetensors").exists()
    kernel(tiny(tmp_path, "part", rl=rl, max_steps=6, save_every=3, grad_accum=2)).run(resume=True)

    a = load_file(str(latest_checkpoint(full.config.run_dir) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(part.config.run_dir) / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise on CPU fp32
    ra, rb = rows(full.config.run_dir), rows(part.config.run_dir)
    for key in ("train/loss", "rl/reward/mean", "rl/kl", "rl/clip_ratio/region_mean"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert [r["rl/iteration"] for r in ra] == [0, 1] * 3
    assert all(r["rl/reward/std"] > 0 for r in ra)  # a real learning signal
    assert any(r["rl/clip_ratio/region_mean"] > 0 for r in ra if r["rl/iteration"] == 1)  # off-policy iteration
    assert not (latest_checkpoint(full.config.run_dir) / "rollout.safetensors").exists()  # end of a generation


def test_cli_run_logs_rl_metrics_and_evaluates(tmp_path):
    cfg = tiny(tmp_path, "cli", rl={"rewards": {"causal_loop_exact": 1.0}, "beta": 0.02,
                                    "mask_truncated_completions": True}, max_steps=2)
    cfg["eval"]["at_end"] = True
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("run", str(path))
    assert res.returncode == 0, res.stderr
    got = rows(tmp_path / "cli")
    train = [r for r in got if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("rl/reward/mean", "rl/reward/std", "rl/reward/causal_loop_exact/mean",
                "rl/reward/causal_loop_exact/std", "rl/advantage/mean", "rl/advantage/std", "rl/advantage/min",
                "rl/advantage/max", "rl/clip_ratio/low_mean", "rl/clip_ratio/high_mean",
                "rl/clip_ratio/region_mean", "rl/kl", "rl/completion_length/mean", "rl/completion_length/min",
                "rl/completion_length/max", "rl/truncated_frac", "rl/loss_tokens", "train/tokens_per_s",
                "train/loss", "train/lr", "train/grad_norm"):
        assert key in train[-1], key
    assert "eval/accuracy" in got[-1]
    # every completion of an untrained model runs to the length limit: all masked out
    assert train[-1]["rl/truncated_frac"] == 1.0 and train[-1]["rl/loss_tokens"] == 0.0
    assert "report: " in res.stdout


def test_reward_functions_get_the_extras_they_ask_for(tmp_path):
    seen = {}
    k = Kernel(tiny(tmp_path, "extras", max_steps=1, rl={"rewards": {"with_extras": 1.0, "with_kwargs": 0.5}}))
    k.register(Rewards(seen), name="test_rewards")
    k.run()
    n = 2 * 4
    assert len(seen["texts"]) == n and seen["examples"][0] is seen["examples"][3]  # a prompt's group
    assert seen["lengths"] == [len(ids) for ids in seen["ids"]]
    eos = seen["tokenizer"].eos_token_id
    for ids, trunc in zip(seen["ids"], seen["truncated"]):
        assert trunc == (ids[-1:] != [eos])
        assert len(ids) <= 10 + (not trunc)
    assert seen["kwargs"] == ["completion_ids", "completion_lengths", "config", "prompts", "tasks", "tokenizer",
                              "truncated"]
    row = rows(k.config.run_dir)[-1]
    assert row["rl/reward/with_kwargs/mean"] == "nan"  # all None: NaN, not 0
    assert row["rl/reward/mean"] == 0.0


def test_hook_mask_reaches_the_loss_in_a_run(tmp_path):
    class OnlyFirstToken:
        @hookimpl
        def metareason_rl_loss_mask(self, completion_ids, completion_mask):
            keep = torch.zeros_like(completion_mask)
            keep[:, 0] = True
            return keep

    k = kernel(tiny(tmp_path, "hook", max_steps=1), OnlyFirstToken())
    k.run()
    row = rows(k.config.run_dir)[-1]
    assert row["rl/loss_tokens"] == 1.0 and row["rl/completion_length/mean"] > 1


def test_no_reference_model_at_beta_zero(tmp_path, monkeypatch):
    import metareason.train.grpo as grpo

    def refuse(model):
        raise AssertionError("a reference model was built at beta 0")

    monkeypatch.setattr(grpo, "build_reference", refuse)
    generated = []
    real = grpo.generate_rollout
    monkeypatch.setattr(grpo, "generate_rollout", lambda *a, **kw: generated.append(1) or real(*a, **kw))
    k = kernel(tiny(tmp_path, "beta0", max_steps=4, rl={"num_iterations": 2}))
    k.run()
    assert len(generated) == 2  # one generation per num_iterations optimizer steps
    with pytest.raises(AssertionError, match="reference model"):
        kernel(tiny(tmp_path, "beta1", max_steps=1, rl={"beta": 0.1})).run()


@pytest.mark.parametrize("rl,train,match", [
    ({"rewards": {}}, {}, r"rl\.rewards: no reward functions"),
    ({"rewards": {"nope": 1.0}}, {}, r"rl\.rewards\.nope: unknown reward \(registered: .*frac_target"),
    ({}, {"grad_accum": 3}, r"train\.grad_accum: 3 does not divide the 8 completions"),
    ({"num_generations": 1}, {}, r"rl\.num_generations: .*greater than or equal to 2"),
    ({"loss_type": "ppo"}, {}, r"rl\.loss_type: "),
])
def test_config_errors_name_the_field(tmp_path, rl, train, match):
    with pytest.raises(ConfigError, match=match) as err:
        kernel(tiny(tmp_path, "bad", rl=rl, **train)).run()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_sft_checkpoint_is_a_starting_policy(tmp_path):
    sft = tiny(tmp_path, "sft", max_steps=2)
    sft["train"]["algorithm"] = "sft"
    sft["data"]["max_length"] = 64
    Kernel(sft).run()
    ckpt = latest_checkpoint(tmp_path / "sft")
    rl_cfg = tiny(tmp_path, "from_sft", max_steps=1)
    rl_cfg["model"] = {"path": str(ckpt)}  # tokenizer and weights from the checkpoint directory
    k = kernel(rl_cfg)
    model, tok = k.load()
    saved = load_file(str(ckpt / "model.safetensors"))
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert tok.get_vocab() == Kernel(sft).load()[1].get_vocab()
    k.run()
    assert [p.name for p in list_checkpoints(tmp_path / "from_sft")] == ["step-0000001"]


@pytest.mark.slow
def test_bench_grpo_runs_both_sides_on_the_same_work(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "grpo.json"
    res = run_cli("bench", "grpo", "--steps", "1", "--warmup", "1", "--prompts", "2", "--num-generations", "2",
                  "--completion-length", "5", "--sides", "ours,trl", "--out", str(out))
    assert res.returncode == 0, res.stderr
    record = json.loads(out.read_text())
    assert record["ours"]["completion_tokens"] == record["trl"]["completion_tokens"] == 5.0
    assert record["speedup"] > 0 and record["peak_memory_ratio"] > 0
    assert "| metareason (share_prompt_forward on) |" in out.with_suffix(".md").read_text()


# ------------------------------------------------------------------ the loop passes the config on
def _logged(tmp_path, name, rl, steps=1, **train):
    k = kernel(tiny(tmp_path, name, rl=dict({"temperature": 1.0}, **rl), max_steps=steps, seed=3, **train))
    k.run()
    return [json.loads(l) for l in (k.config.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_type_from_the_config_reaches_the_loss(tmp_path):
    """Same seed, same rollout: the three aggregations give three different logged losses."""
    losses = {lt: _logged(tmp_path, lt, {"loss_type": lt, "rewards": {"frac_digits": 1.0}})[0]
              for lt in ("grpo", "dr_grpo", "dapo")}
    assert len({r["rl/reward/mean"] for r in losses.values()}) == 1  # the same rollout
    values = [r["train/loss"] for r in losses.values()]
    assert all(abs(a - b) > 1e-6 for i, a in enumerate(values) for b in values[i + 1:]), losses


def test_scale_rewards_from_the_config_reaches_the_advantages(tmp_path):
    rows = {s: _logged(tmp_path, s, {"scale_rewards": s, "rewards": {"frac_digits": 1.0}})[0]
            for s in ("group", "batch", "none")}
    assert len({r["rl/reward/mean"] for r in rows.values()}) == 1
    stds = [r["rl/advantage/std"] for r in rows.values()]
    assert all(abs(a - b) > 1e-4 for i, a in enumerate(stds) for b in stds[i + 1:]), stds


def test_epsilon_high_from_the_config_reaches_the_clip(tmp_path):
    """Second iteration on one rollout (the policy moved): a huge upper bound clips nothing above."""
    rl = {"num_iterations": 2, "epsilon": 1e-3, "rewards": {"frac_digits": 1.0}, "loss_type": "dapo"}
    same = _logged(tmp_path, "same", dict(rl, epsilon_high=1e-3), steps=2, lr=5e-2)[1]
    wide = _logged(tmp_path, "wide", dict(rl, epsilon_high=100.0), steps=2, lr=5e-2)[1]
    assert same["rl/iteration"] == wide["rl/iteration"] == 1
    assert same["rl/clip_ratio/high_mean"] > 0 and wide["rl/clip_ratio/high_mean"] == 0
    assert wide["rl/clip_ratio/low_mean"] == pytest.approx(same["rl/clip_ratio/low_mean"], abs=1e-9)


def test_the_step_is_normalised_by_all_its_tokens_not_each_micro_batch(tmp_path):
    """dapo: one step over the same rollout logs the same loss in 1 or 2 micro-batches."""
    rl = {"loss_type": "dapo", "rewards": {"frac_digits": 1.0}}
    one = _logged(tmp_path, "one", rl, grad_accum=1)[0]
    two = _logged(tmp_path, "two", rl, grad_accum=2)[0]
    assert one["rl/reward/mean"] == two["rl/reward/mean"]
    assert two["rl/completion_length/min"] != two["rl/completion_length/max"]  # uneven micro-batches
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5, abs=1e-7)
