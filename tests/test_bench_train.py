"""`metareason bench train` end to end on a tiny config: every side runs in its own process on
the same batches (the bench refuses sides that counted different tokens), and the record names
the settings each side ran, the command and the load average."""
import json

import yaml

from tests.conftest import TINY_LLAMA, run_cli


def test_bench_train_writes_json_and_markdown_with_each_sides_settings(tmp_path):
    cfg = {"name": "b", "output_dir": str(tmp_path), "quiet": True,
           "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
           "data": {"max_length": 128, "train": [{"task": "causal_loop", "num_samples": 64,
                                                   "params": {"levels": [1, 2]}}]},
           "train": {"group_by_length": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "train.json"
    res = run_cli("bench", "train", "--config", str(path), "--steps", "2", "--warmup", "1", "--batch-size", "8",
                  "--repeats", "1", "--threads", "1", "--floor", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["baseline"] in ("hf_flatten", "hf_padded") and r["repeats"] == 1
    assert r["ours"]["timed_tokens"] == r["hf_flatten"]["timed_tokens"] == r["hf_padded"]["timed_tokens"] \
        == r["floor"]["timed_tokens"] > 0
    assert r["against_plain_loop"]["ours"] == r["ours"]["tokens_per_cpu_s"] / r["floor"]["tokens_per_cpu_s"]
    assert r["ours"]["packing"].startswith("train.packing=auto: on")
    assert r["ours"]["fused_ce"].startswith("train.fused_ce=auto: on")
    assert r["ours"]["lean_activations"].startswith("train.lean_activations=auto: on (2 MLPs through swiglu_down")
    assert "--lean-activations auto" in r["command"]
    assert "train.lean_activations=auto: on" in out.with_suffix(".md").read_text()
    assert r["hf_flatten"]["collator"] == "DataCollatorWithFlattening"
    assert r["speed_ratio"] == r["ours"]["tokens_per_s"] / r[r["baseline"]]["tokens_per_s"]
    # peak step memory: allocated tensors during one profiled step (profiler), on every side
    for side in ("ours", "hf_flatten", "hf_padded", "floor"):
        assert r[side]["step_peak_mb"] > 0 and r[side]["runs"][0]["steps"] == 1 + 2 + 1, side
    assert r["step_memory_ratio"] == r["ours"]["step_peak_mb"] / r[r["baseline"]]["step_peak_mb"]
    assert "--repeats 1" in r["command"] and "--floor" in r["command"] and len(r["load_average_before"]) == 3
    assert "Command: `metareason bench train" in out.with_suffix(".md").read_text()


def test_bench_grpo_writes_the_ratio_and_both_sides_breakdown(tmp_path, tiny_model_dir):
    """`metareason bench grpo` end to end: ours and TRL on the same model and prompts, each side in
    its own process; the record holds both sides' per-phase breakdown and the command. The model's
    tokenizer has a chat template: both sides must compute on the same templated prompt tokens
    (TRL applies no template to plain-string prompts, so the bench gives it the rendered text)."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(model_dir)
    cfg = {"name": "g", "output_dir": str(tmp_path), "quiet": True,
           "model": {"path": str(model_dir)},
           "data": {"max_length": 128, "train": [{"task": "causal_loop", "num_samples": 8,
                                                   "params": {"levels": [1]}}]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "grpo.json"
    res = run_cli("bench", "grpo", "--config", str(path), "--steps", "2", "--warmup", "1", "--prompts", "2",
                  "--num-generations", "2", "--completion-length", "4", "--threads", "1", "--repeats", "1",
                  "--sides", "ours,ours_unshared,trl", "--out", str(out), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    text = out.with_suffix(".md").read_text()
    assert "Command: `metareason bench grpo" in text and "--sides ours,ours_unshared,trl" in r["command"]
    assert r["decoder"] == "lean"
    # what our side's train.lean_activations resolved to is recorded, and the command repeats the flag
    assert r["ours"]["lean_activations"].startswith("train.lean_activations=auto: on"), r["ours"].get("lean_activations")
    assert "--lean-activations auto" in r["command"] and "our activations: train.lean_activations=auto: on" in text
    for side in ("ours", "ours_unshared", "trl"):
        assert r[side]["step_s"] > 0 and r[side]["sampling_s"] > 0, side
    # the separate row really runs the plain forward: share_prompt_forward on for ours, off for the other
    assert r["ours"]["share_prompt_forward"] is True and r["ours_unshared"]["share_prompt_forward"] is False
    assert abs(r["speedup_unshared"] - r["trl"]["step_s"] / r["ours_unshared"]["step_s"]) < 1e-9
    assert "share_prompt_forward off" in text
    assert abs(r["speedup"] - r["trl"]["step_s"] / r["ours"]["step_s"]) < 1e-9
    # the same prompt tokens on every side, the template's included ("<user>" + prompt + "<assistant>")
    raw = len("A=1;B=A+1;C=B+1;D=C+1;D=?")  # level-1 prompts all have this length in characters
    assert r["ours"]["prompt_tokens"] == r["ours_unshared"]["prompt_tokens"] == r["trl"]["prompt_tokens"]
    assert r["trl"]["prompt_tokens"] >= raw + len("<user>\n<assistant>")
