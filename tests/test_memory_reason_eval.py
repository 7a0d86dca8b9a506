"""memory_reason evaluation: the attention heatmap's numbers (a partition of the answer tokens'
attention), the report section with the PNG, the eval metrics, and `metareason eval RUN_DIR` of a
lora+prompt-tuning run giving back the metrics of the end of training."""
import json

import pytest
import torch

from metareason import Kernel
from metareason.data.tokenize import prompt_ids
from metareason.plugins.memory_reason.attention import _categories, attention_shares
from metareason.plugins.memory_reason.report import write_section
from metareason.plugins.memory_reason.tokens import vocabulary

from conftest import TINY_LLAMA, run_cli

STEPS = [{"type": "memory", "text": "Ava has 3 pens."}, {"type": "memory", "text": "Bo has 4 pens."},
         {"type": "reason", "text": "3+4=7"}]
TYPED = ("<memory_0> Ava has 3 pens.\n<prefix_0><memory_0> Bo has 4 pens.\n<prefix_0><reason_0> 3+4=7\n"
         "<prefix_0><answer_0> The answer is: 7")


def config(tmp_path, mode="full", path=None, **extra):
    model = {"tokenizer": {"type": "char"}, "device": "cpu"}
    if path is None:
        model["arch"] = dict(TINY_LLAMA)
    else:
        model["path"] = str(path)
    if "lora" in mode:
        model["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["gate_proj", "down_proj"]}
    raw = {"name": "mr_eval", "output_dir": str(tmp_path), "quiet": True, "model": model,
           "data": {"max_length": 256,
                    "train": [{"task": "memory_world", "num_samples": 16, "params": {"entities": 4, "attributes": 1}}],
                    "eval": [{"task": "memory_world", "num_samples": 4, "seed": 1,
                              "params": {"entities": 4, "attributes": 1, "split": "heldout"}}]},
            "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "lr": 5e-3},
            "generation": {"max_new_tokens": 40},
            "memory_reason": {"enabled": True, "mode": mode, "n_prefix": 1, "n_special": 1, "attention_samples": 4}}
    raw.update(extra)
    return raw


def test_categories_follow_the_lines_and_untyped_steps_take_the_gold_type(tmp_path):
    _, tok = Kernel(config(tmp_path)).load()
    voc = vocabulary(Kernel(config(tmp_path)).config.memory_reason)
    enc = tok(TYPED, add_special_tokens=False, return_offsets_mapping=True)
    cats = _categories(TYPED, enc["offset_mapping"], voc, "The answer is: ", STEPS)
    text = [TYPED[a:b] for a, b in enc["offset_mapping"]]
    joined = {c: "".join(t for t, k in zip(text, cats) if k == c) for c in ("memory", "reason", "answer")}
    assert joined["memory"] == "<memory_0> Ava has 3 pens.<prefix_0><memory_0> Bo has 4 pens."
    assert joined["reason"] == "<prefix_0><reason_0> 3+4=7"
    assert joined["answer"] == "<prefix_0><answer_0> The answer is: 7"
    assert [t for t, k in zip(text, cats) if k is None] == ["\n"] * 3
    plain = "Ava has 3 pens.\nBo has 4 pens.\n3+4=7\nThe answer is: 7"
    enc = tok(plain, add_special_tokens=False, return_offsets_mapping=True)
    cats = _categories(plain, enc["offset_mapping"], voc, "The answer is: ", STEPS)
    assert "".join(plain[a:b] for (a, b), k in zip(enc["offset_mapping"], cats) if k == "reason") == "3+4=7"


def test_attention_shares_partition_the_answer_tokens_attention(tmp_path):
    kernel = Kernel(config(tmp_path))
    model, tok = kernel.load()
    voc = vocabulary(kernel.config.memory_reason)
    sample = {"prompt": "Q: How many pens do Ava and Bo have together?\n<prefix_0>", "completion": TYPED,
              "example": {"cot_steps": STEPS}}
    shares = attention_shares(model, tok, [sample], voc, "The answer is: ")
    assert shares.shape == (TINY_LLAMA["num_hidden_layers"], 4)
    assert model.config._attn_implementation != "eager"  # restored
    # the rest of each answer token's attention is on the three newlines between lines
    p = prompt_ids(tok, sample["prompt"])
    c = tok(TYPED, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    newline = [len(p) + i for i, t in enumerate(c) if t == tok.convert_tokens_to_ids("\n")]
    answer_start = len(p) + c.index(tok.convert_tokens_to_ids("<answer_0>")) - 1  # its <prefix_0>
    queries = list(range(answer_start, ids.shape[1]))
    for layer, a in enumerate(att):
        rows = a[0].mean(0)[queries]
        nl = rows[:, newline].sum(-1).mean()
        assert float(shares[layer].sum() + nl) == pytest.approx(1.0, abs=1e-5)
        prompt_mass = rows[:, : len(p)].sum(-1).mean()
        assert float(shares[layer, 0]) == pytest.approx(float(prompt_mass), abs=1e-6)


def test_report_section_with_heatmap(tmp_path):
    stats = {"memory_steps": 2.0, "reason_steps": 1.0, "steps": 3.0, "wrong": 2, "attributed": 2,
             "error_memory": 0.5, "error_reason": 0.5, "error_neither": 0.0, "attn_memory": 0.3, "attn_reason": 0.2}
    write_section(tmp_path, 7, stats, torch.rand(2, 4))
    md = (tmp_path / "report_sections" / "memory_reason.md").read_text()
    assert "![answer attention](plots/memory_reason_attention.png)" in md and "| memory | 0.500 |" in md
    assert (tmp_path / "plots" / "memory_reason_attention.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_run_then_eval_cli_gives_back_the_same_metrics_and_report(tmp_path, tiny_model_dir):
    raw = config(tmp_path, mode="lora+prompt-tuning", path=tiny_model_dir)
    kernel = Kernel(raw)
    metrics = kernel.run()
    for key in ("memory_steps", "reason_steps", "steps", "wrong", "error_memory", "error_reason", "error_neither"):
        assert f"eval/memory_reason/{key}" in metrics
    assert metrics["eval/memory_reason/wrong"] == 4 - round(4 * metrics["eval/accuracy"])
    run_dir = kernel.config.run_dir
    report = (run_dir / "report.md").read_text()
    assert "## Memory and reason steps" in report
    (run_dir / "report.md").unlink()
    res = run_cli("eval", str(run_dir), env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 2
    for key in ("eval/accuracy", "eval/gen_tokens", "eval/memory_reason/steps", "eval/memory_reason/error_memory"):
        assert evals[1][key] == evals[0][key], key
    assert "## Memory and reason steps" in (run_dir / "report.md").read_text()
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].endswith("<prefix_0>") for s in samples)
