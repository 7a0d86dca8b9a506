"""``metareason export``: a LoRA / QLoRA / full run's checkpoint as a standard Hugging Face
directory that ``AutoModelForCausalLM.from_pretrained`` and ``model.path`` both load, with the
logits of the trained model."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from metareason import Kernel
from metareason.model_export import export_run
from metareason.trained import load_trained
from tests.conftest import TINY_LLAMA, run_cli

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 11]])


def run_config(tmp_path, name, model):
    return {
        "name": name, "output_dir": str(tmp_path / "runs"), "plugins": [], "quiet": True,
        "model": model,
        "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 16, "params": {"levels": [1]}}]},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-2, "save_every": 0, "log_every": 1},
        "eval": {"at_end": False},
    }


def train(tmp_path, name, model):
    kernel = Kernel(run_config(tmp_path, name, model))
    kernel.run()
    return kernel.config.run_dir


def trained_logits(run_dir, **kw):
    t = load_trained(run_dir, **kw)
    with torch.no_grad():
        return t.model.eval()(input_ids=IDS).logits


def loaded_logits(out):
    """The exported directory through both doors: transformers' Auto class and a run's model.path."""
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    kernel_model, _ = Kernel({"plugins": [], "model": {"path": str(out), "dtype": "float32"}}).load()
    with torch.no_grad():
        return hf(input_ids=IDS).logits, kernel_model.eval()(input_ids=IDS).logits


LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_lora_run_on_a_local_model_with_added_tokens(tmp_path, tiny_model_dir, merge):
    run_dir = train(tmp_path, "lora", {"path": str(tiny_model_dir), "lora": LORA, "special_tokens": ["<x>"]})
    expected = trained_logits(run_dir)
    out = tmp_path / "export"
    proc = run_cli("export", str(run_dir), "--out", str(out), *(["--merge"] if merge else []))
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert ("adapter_model.safetensors" in names) == (not merge)
    hf, kernel = loaded_logits(out)
    assert hf.shape[-1] == expected.shape[-1]  # the added token's row came along
    torch.testing.assert_close(hf, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, expected, atol=1e-5, rtol=1e-5)
    # the adapter changed the model: an export of the bare base would not match
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=IDS).logits, expected[..., : base.config.vocab_size], atol=1e-3)


def test_lora_run_on_a_random_init_base(tmp_path):
    """The checkpoint holds only the adapter; the base comes back from the run's seed."""
    run_dir = train(tmp_path, "arch", {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}, "lora": LORA})
    expected = trained_logits(run_dir)
    out = export_run(run_dir, tmp_path / "export", merge=True)
    hf, kernel = loaded_logits(out)
    torch.testing.assert_close(hf, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, expected, atol=1e-5, rtol=1e-5)


def test_full_fine_tune_export_equals_the_checkpoint(tmp_path, tiny_model_dir):
    run_dir = train(tmp_path, "full", {"path": str(tiny_model_dir)})
    expected = trained_logits(run_dir)
    out = export_run(run_dir, tmp_path / "export")
    hf, kernel = loaded_logits(out)
    assert torch.equal(hf, expected) and torch.equal(kernel, expected)
    assert not (out / "optimizer.pt").exists()


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_qlora_run_exports_a_dequantized_model(tmp_path, tiny_model_dir, merge):
    pytest.importorskip("bitsandbytes")
    run_dir = train(tmp_path, "qlora", {"path": str(tiny_model_dir), "lora": LORA,
                                        "quantization": {"load_in_4bit": True, "compute_dtype": "float32"}})
    out = export_run(run_dir, tmp_path / "export", merge=merge)
    info = json.loads((out / "metareason_export.json").read_text())
    assert info["base_dequantized"] and info["merged"] == merge
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    hf, kernel = loaded_logits(out)
    # the unquantised base with the adapter, as `metareason export` documents it
    expected = trained_logits(run_dir, overrides=["model.quantization.load_in_4bit=false"])
    torch.testing.assert_close(hf, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, expected, atol=1e-5, rtol=1e-5)


def test_export_refuses_a_non_empty_out_and_a_run_without_checkpoints(tmp_path, tiny_model_dir):
    run_dir = train(tmp_path, "full", {"path": str(tiny_model_dir)})
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = run_cli("export", str(run_dir), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --out: "), proc.stderr
    assert (out / "keep.txt").read_text() == "x" and len(list(out.iterdir())) == 1
    proc = run_cli("export", str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
    assert not (tmp_path / "x").exists()
