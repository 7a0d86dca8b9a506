"""configs/cspo/sft_qlora.yaml: the MERA seed's QLoRA recipe validates and trains on takeover
data (with control segments) when model.path points at a tiny local model."""
import json
import math

import pytest

from metareason import Kernel
from tests.conftest import REPO

CONFIG = REPO / "configs" / "cspo" / "sft_qlora.yaml"


def test_recipe_values():
    cfg = Kernel(CONFIG, overrides=["plugins=[cspo]"]).config
    q, lora = cfg.model.quantization, cfg.model.lora
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout, lora.target_modules) == (True, 64, 16, 0.05, "all-linear")
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum) == (1e-6, 1, 8)
    assert cfg.cspo.enabled and cfg.data.max_length == 8192


def test_qlora_sft_runs_two_steps_on_a_tiny_local_model(tiny_model_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    data = tmp_path / "takeover.jsonl"
    rows = [{"prompt": f"A={i};B=A+1;B=?", "completion": f"B={i}+1={i + 1};wait<control>conclude</control>answer:{i + 1}",
             "answer": str(i + 1)} for i in range(1, 9)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kernel = Kernel(CONFIG, overrides=[
        "plugins=[cspo]", f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "train.max_steps=2",
        "train.grad_accum=2", "train.lr=1e-3", "data.max_length=128", "quiet=true",
        f"data.train=[{{task: jsonl, params: {{path: {data}, question_field: prompt, completion_field: completion}}}}]",
    ])
    kernel.run()
    model = kernel.last_model
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.quant_type == "nf4" for m in linear4)
    assert linear4[0].weight.quant_state.nested  # double quantisation
    assert "<control>" in kernel.last_tokenizer.get_vocab()
    run_dir = tmp_path / "cspo-sft-qlora"
    losses = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "train/loss" in r] == [2]
    assert all(math.isfinite(r["train/loss"]) for r in losses if "train/loss" in r)
    ckpt = run_dir / "checkpoints" / "step-0000002"
    assert (ckpt / "adapter_model.safetensors").exists()  # LoRA adapters, not the 4-bit base
