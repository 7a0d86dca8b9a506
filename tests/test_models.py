"""Model loader: char tokenizer round trip, local/offline loading, special tokens with mean
init, QLoRA (bitsandbytes 4-bit on CPU + PEFT LoRA), and one-line load errors."""
import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from metareason import Kernel, hookimpl
from metareason.config import ModelConfig
from metareason.errors import ModelLoadError
from metareason.models import SpecialToken, add_special_tokens, build_char_tokenizer
from metareason.models.loader import load_model, load_tokenizer
from tests.conftest import TINY_LLAMA, run_cli


def test_char_tokenizer_round_trip(tmp_path):
    tok = build_char_tokenizer()
    text = "A=3;B=A+2;C=B*2\nanswer: 9"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(text, add_special_tokens=False).input_ids == ids
    assert loaded.decode(ids) == text
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "</s>"
    # special tokens added later are matched whole
    loaded.add_tokens(["<control>"], special_tokens=True)
    ids = loaded("a<control>b", add_special_tokens=False).input_ids
    assert len(ids) == 3 and loaded.convert_ids_to_tokens(ids[1]) == "<control>"


def test_load_local_model_and_tokenizer(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir))
    tok = load_tokenizer(cfg)
    model, new_ids = load_model(cfg, tok)
    assert new_ids == []
    out = model(input_ids=torch.tensor([tok("A=1").input_ids]))
    assert out.logits.shape[-1] == model.config.vocab_size


def test_special_tokens_resize_and_mean_init(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir))
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    emb = model.get_input_embeddings().weight.detach().clone()
    n_old = emb.shape[0]
    ids = add_special_tokens(tok, model, [SpecialToken("<memory>", init_from=("m", "e")), "<reason>"])
    assert len(ids) == 2 and model.get_input_embeddings().weight.shape[0] == n_old + 2
    new = model.get_input_embeddings().weight.detach()
    m, e = tok.convert_tokens_to_ids("m"), tok.convert_tokens_to_ids("e")
    torch.testing.assert_close(new[ids[0]], (emb[m] + emb[e]) / 2)
    torch.testing.assert_close(new[ids[1]], emb.mean(dim=0))
    # old rows untouched, adding again is a no-op
    torch.testing.assert_close(new[:n_old], emb)
    assert add_special_tokens(tok, model, ["<reason>"]) == []


def test_kernel_adds_plugin_special_tokens_and_prepares_model(tiny_model_dir):
    class Plugin:
        @hookimpl
        def metareason_special_tokens(self, config):
            return [SpecialToken("<control>", init_from=("c",))]

        @hookimpl
        def metareason_prepare_model(self, model, new_token_ids):
            for p in model.parameters():
                p.requires_grad_(False)
            model.marked_new_ids = list(new_token_ids)
            return None

    kernel = Kernel({"plugins": [], "model": {"path": str(tiny_model_dir)}})
    kernel.register(Plugin(), name="p")
    model, tok = kernel.load()
    cid = tok.convert_tokens_to_ids("<control>")
    assert model.marked_new_ids == [cid]
    assert not any(p.requires_grad for p in model.parameters())


def test_arch_config_random_init(tmp_path):
    cfg = ModelConfig(arch=dict(TINY_LLAMA), tokenizer={"type": "char"})
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_model(ModelConfig(path=str(tmp_path)), load_tokenizer(ModelConfig(path=str(tmp_path))))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match=r"model.path: .*nope: no such directory"):
        load_model(ModelConfig(path=str(tmp_path / "nope")), build_char_tokenizer())
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config.json: corrupt JSON"):
        load_model(ModelConfig(path=str(bad)), build_char_tokenizer())
    # a tokenizer with more tokens than the model has rows
    small = tmp_path / "small"
    shutil.copytree(tiny_model_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 50
    (small / "config.json").write_text(json.dumps(cfg))
    (small / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="incompatible tokenizer|cannot load model"):
        load_model(ModelConfig(path=str(small)), build_char_tokenizer())
    with pytest.raises(ModelLoadError, match="model.arch.model_type: field required"):
        load_model(ModelConfig(arch={"hidden_size": 8}), build_char_tokenizer())
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))


@pytest.mark.parametrize("arch, expected", [
    (dict(TINY_LLAMA, hidden_size="big"), r"^model\.arch\.hidden_size: Field 'hidden_size' expected int"),
    ({"model_type": "deepseek_mla", "hidden_size": "big"}, r"^model\.arch\.hidden_size: expected an int >= 1"),
    ({"model_type": "no_such_arch"}, r"^model\.arch\.model_type: 'no_such_arch': "),
])
def test_wrongly_typed_arch_field_is_one_line_naming_it(arch, expected):
    Kernel({"model": {"arch": {"model_type": "llama"}}}).registries  # registers deepseek_mla
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model(ModelConfig(arch=arch, tokenizer={"type": "char"}), build_char_tokenizer())
    assert "\n" not in str(info.value)


def test_wrongly_typed_arch_field_through_the_cli(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  arch: {model_type: llama, hidden_size: big}\n  tokenizer: {type: char}\n"
                   "data:\n  train: [{task: causal_loop, num_samples: 8}]\ntrain: {max_steps: 1}\n"
                   f"output_dir: {tmp_path}\n")
    proc = run_cli("run", str(cfg))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model.arch.hidden_size: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_qlora_on_cpu(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = ModelConfig(path=str(tiny_model_dir), gradient_checkpointing=True,
                      quantization={"load_in_4bit": True, "compute_dtype": "float32"},
                      lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"})
    tok = load_tokenizer(cfg)
    model, _ = load_model(cfg, tok)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "no 4-bit layers"
    assert all(m.weight.quant_type == "nf4" for m in linear4)
    assert linear4[0].weight.quant_state.nested  # double quantisation
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([tok("A=1;B=A+2;").input_ids])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)


def test_4bit_without_lora_is_refused(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(path=str(tiny_model_dir), quantization={"load_in_4bit": True})
    with pytest.raises(ModelLoadError, match="set model.lora.enabled: true"):
        load_model(cfg, load_tokenizer(cfg))
