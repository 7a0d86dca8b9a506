"""mcft end to end: critique data from a base generator and a teacher (`metareason mcft
critiques`), a training run whose loss sees the masked labels, `metareason mcft eval`, the
eval format metric, bad input, and the comparison command on a miniature budget."""
import json

import pytest
import torch
import yaml

from metareason import Kernel, hookimpl
from metareason.data.tokenize import IGNORE_INDEX
from tests.conftest import TINY_LLAMA, run_cli
from tests.test_mcft import tiny_config, write_rows

from metareason.plugins.mcft import format as fmt

ENV = {"METAREASON_PLUGINS": "mcft", "OMP_NUM_THREADS": "1"}


def critique_config(tmp_path, **mcft):
    return {"name": "crit", "output_dir": str(tmp_path), "quiet": True,
            "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
            "mcft": dict({"enabled": True, "base_generator": "base", "teacher_generator": "teacher"}, **mcft),
            "generators": {"base": {"type": "python", "function": "metareason.plugins.mcft.teacher:noisy_solver"},
                           "teacher": {"type": "python",
                                       "function": "metareason.plugins.mcft.teacher:causal_loop_teacher"}},
            "data": {"train": [{"task": "causal_loop", "num_samples": 30, "params": {"levels": [1, 3]}}],
                     "eval": [{"task": "causal_loop", "num_samples": 5, "seed": 7, "params": {"levels": [2]}}]}}


def test_critiques_command_builds_rows_the_mcft_task_reads(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(critique_config(tmp_path, attempts=2)))
    out = tmp_path / "crit.jsonl"
    r = run_cli("mcft", "critiques", str(cfg), "--out", str(out), "--quiet", env=ENV)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) == 60 and summary["answer_match"] == 60 and summary["malformed"] == 0
    assert 0 < summary["attempts_correct"] < 60
    wrong = [r for r in rows if not r["attempt_correct"]]
    assert all(r["critique"].startswith("Step ") and "is wrong" in r["critique"] or "final answer" in r["critique"]
               for r in wrong)
    assert all(r["answer"] == r["gold"] for r in rows)
    from metareason.plugins.mcft.data import make_task

    task = make_task({"path": str(out)}, 0, 1000)
    assert len(task) == 60 and task.dropped == 0
    # the eval split and the default output path
    from metareason.plugins.mcft.critiques import build_critiques

    got = build_critiques(Kernel(critique_config(tmp_path)), "eval", quiet=True)
    assert got["output"] == str(tmp_path / "crit" / "critiques-eval.jsonl") and got["rows"] == 5


def test_critiques_without_a_teacher_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    data = critique_config(tmp_path)
    data["mcft"]["teacher_generator"] = None
    cfg.write_text(yaml.safe_dump(data))
    r = run_cli("mcft", "critiques", str(cfg), env=ENV)
    assert r.returncode != 0
    assert "mcft.teacher_generator: required" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from metareason.config import ConfigError
    from metareason.plugins.mcft.critiques import build_critiques

    data["mcft"]["teacher_generator"] = "nobody"
    with pytest.raises(ConfigError, match="generators: no generator named 'nobody'"):
        build_critiques(Kernel(data), "train", tmp_path / "x.jsonl", quiet=True)
    assert not (tmp_path / "x.jsonl").exists()


class LabelSpy:
    def __init__(self):
        self.labels = []

    @hookimpl
    def metareason_extra_losses(self, batch):
        self.labels.append((batch["input_ids"].clone(), batch["labels"].clone(), batch["attention_mask"].sum(1)))


def test_training_loss_sees_the_masked_labels_and_eval_reports_format(tmp_path):
    data = tmp_path / "d.jsonl"
    write_rows(data, n=24)
    cfg = tiny_config(tmp_path, data, name="run", threshold=0.5)
    cfg["eval"] = {"at_end": True}
    k = Kernel(cfg)
    spy = LabelSpy()
    k.register(spy, name="spy")
    metrics = k.run()
    assert "eval/mcft_format" in metrics and 0.0 <= metrics["eval/mcft_format"] <= 1.0
    tok = k.load()[1]
    open_id, close_id = tok.convert_tokens_to_ids(fmt.THINK), tok.convert_tokens_to_ids(fmt.THINK_END)
    inside = dropped = 0
    for ids, labels, lengths in spy.labels:
        for row, lab, n in zip(ids.tolist(), labels, lengths.tolist()):
            lo, hi = row.index(open_id), row.index(close_id)
            inside += hi - lo - 1
            dropped += int((lab[lo + 1: hi] == IGNORE_INDEX).sum())
            assert torch.equal(lab[hi:n], torch.tensor(row[hi:n]))  # </think> ... EOS: all in the loss
            assert torch.equal(lab[lo:lo + 1], torch.tensor(row[lo:lo + 1]))
    assert 0.35 < dropped / inside < 0.65

    r = run_cli("mcft", "eval", str(tmp_path / "run"), "--entropy-threshold", "0.0", env=ENV)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == json.loads((tmp_path / "run" / "mcft_eval.json").read_text())
    assert got["num_samples"] == 4 and got["entropy_flag/flagged"] == 4 and got["entropy_threshold"] == 0.0
    for key in ("accuracy", "format_adherence", "entropy_flag/auroc", "entropy_flag/precision", "entropy_flag/recall"):
        assert key in got
    samples = [json.loads(l) for l in (tmp_path / "run" / "mcft_eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["mean_entropy"] > 0 for s in samples)
    r = run_cli("mcft", "eval", str(tmp_path / "nothere"), env=ENV)
    assert r.returncode != 0 and "no such run directory" in r.stderr


def test_disabled_plugin_adds_no_tokens_and_no_terms(tmp_path):
    data = tmp_path / "d.jsonl"
    write_rows(data, n=8)
    k = Kernel(tiny_config(tmp_path, data, enabled=False))
    model, tok = k.load()
    assert tok.convert_tokens_to_ids(fmt.THINK) == tok.unk_token_id
    assert k.pm.hook.metareason_extra_losses(model=model, batch={}, outputs=None, config=k.config, step=0) == []


def test_config_errors_name_the_field(tmp_path):
    from metareason.config import ConfigError

    data = tmp_path / "d.jsonl"
    write_rows(data, n=4)
    for bad, field in (({"threshold": 1.5}, "mcft.threshold"), ({"bf_beta": -1}, "mcft.bf_beta"),
                       ({"teacher_prompt": "no slots"}, "mcft.teacher_prompt"), ({"thresh": 0.1}, "mcft.thresh")):
        with pytest.raises(ConfigError, match=field):
            Kernel(tiny_config(tmp_path, data, **bad))


@pytest.mark.slow
def test_compare_command_writes_the_report(tmp_path):
    cfg = yaml.safe_load(open("configs/mcft/compare.yaml"))
    cfg.update(output_dir=str(tmp_path / "runs"))
    cfg["model"]["arch"] = dict(TINY_LLAMA, max_position_embeddings=512)
    cfg["data"]["train"][0]["num_samples"] = 40
    cfg["data"]["eval"][0]["num_samples"] = 6
    cfg["train"].update(max_steps=2, batch_size=4, warmup_steps=0)
    cfg["generation"]["max_new_tokens"] = 8
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "res" / "mcft-compare"
    r = run_cli("mcft", "compare", str(path), "--arms", "mcft,answer_sft", "--out", str(out), "--quiet", env=ENV)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.with_suffix(".json").read_text())
    assert set(rec["arms"]) == {"mcft", "answer_sft"} and rec["data"]["train"]["rows"] == 40
    assert rec["arms"]["mcft"]["final_format_term"] is not None and rec["arms"]["answer_sft"]["final_format_term"] is None
    md = out.with_suffix(".md").read_text()
    assert "| mcft | 0.2 | 0.05 | critique |" in md and "metareason mcft compare" in md
    assert not any(a["reused_training"] for a in rec["arms"].values())
    # --reuse: the same arms are evaluated again without training (greedy: the same numbers)
    r = run_cli("mcft", "compare", str(path), "--arms", "mcft,answer_sft", "--out", str(out), "--reuse", env=ENV)
    assert r.returncode == 0, r.stderr
    again = json.loads(out.with_suffix(".json").read_text())
    assert all(a["reused_training"] and a["train_s"] is None for a in again["arms"].values())
    assert [a["accuracy"] for a in again["arms"].values()] == [a["accuracy"] for a in rec["arms"].values()]
    assert again["command"].endswith("--reuse")
    r = run_cli("mcft", "compare", str(path), "--arms", "nope", "--out", str(out), env=ENV)
    assert r.returncode != 0 and "--arms: unknown arm 'nope'" in r.stderr


def wrong_teacher(prompt, **_):
    """A teacher that is wrong (answer off by one) or malformed (no reasoning) now and then."""
    from metareason.plugins.mcft.teacher import causal_loop_teacher

    out = causal_loop_teacher(prompt)
    h = sum(map(ord, prompt)) % 3
    if h == 1:
        return out.replace("<reasoning>", "").replace("</reasoning>", "")
    if h == 2:
        ans = out.rsplit("\\boxed{", 1)[1].split("}")[0]
        return out.replace(f"\\boxed{{{ans}}}", f"\\boxed{{{int(ans) + 1}}}")
    return out


def test_teacher_answers_that_miss_the_gold_are_marked_and_dropped(tmp_path):
    from metareason.plugins.mcft.critiques import build_critiques
    from metareason.plugins.mcft.data import make_task

    cfg = critique_config(tmp_path)
    cfg["generators"]["teacher"]["function"] = "tests.test_mcft_cli:wrong_teacher"
    summary = build_critiques(Kernel(cfg), "train", tmp_path / "c.jsonl", quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert 0 < summary["malformed"] < summary["dropped"] < summary["rows"] == 30
    assert summary["answer_match"] == sum(r["answer_match"] for r in rows) == 30 - summary["dropped"]
    assert all(r["answer_match"] == (r["answer"] == r["gold"] and r["reasoning"] != "") for r in rows)
    task = make_task({"path": str(tmp_path / "c.jsonl")}, 0, 1000)
    assert len(task) == summary["answer_match"] and task.dropped == summary["dropped"]


def test_grpo_run_with_the_format_reward_and_the_format_term(tmp_path):
    """Second option: the format reward on sampled completions through the kernel's GRPO loop;
    the format term runs in the RL call of metareason_extra_losses."""
    data = tmp_path / "d.jsonl"
    write_rows(data, n=8)
    cfg = tiny_config(tmp_path, data, name="rl", bf_beta=0.5)
    cfg["train"] = {"algorithm": "grpo", "max_steps": 1, "batch_size": 2, "log_every": 1, "seed": 0}
    cfg["rl"] = {"num_generations": 4, "rewards": {"mcft_correct": 1.0, "mcft_format": 0.05},
                 "max_completion_length": 12}
    k = Kernel(cfg)
    k.run()
    row = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rl/reward/mcft_format/mean"] == 0.0 and row["rl/reward/mcft_correct/mean"] == 0.0
    assert 0.0 < row["train/mcft_format"] < 1.0
