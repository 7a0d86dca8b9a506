"""Shared fixtures. Tests build tiny models from configs, save them with save_pretrained and
load them back through the real loader; nothing is fetched from a hub."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
EXT_PLUGIN = REPO / "tests" / "ext_plugin"

TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run the CLI in a fresh interpreter, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "metareason", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


def save_bigram_llama(path, chain: dict, extra_tokens: tuple = ()):
    """A Llama with no layers whose embeddings and head encode ``chain`` (greedy: after token ``a``
    it writes ``chain[a]``; anything else -> pad at a lower logit, i.e. the sequence ends), with
    the char tokenizer plus ``extra_tokens``; saved with save_pretrained. Exact outputs by design."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareason.models import build_char_tokenizer
    from metareason.models.special_tokens import add_special_tokens

    tok = build_char_tokenizer()
    if extra_tokens:
        add_special_tokens(tok, None, list(extra_tokens))
    v = len(tok)
    h = v + (v % 2)  # RoPE needs an even head size
    cfg = AutoConfig.for_model("llama", vocab_size=v, hidden_size=h, intermediate_size=8, num_hidden_layers=0,
                               num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.eye(v, h))
        head = torch.zeros(v, h)
        head[tok.pad_token_id, :] = 0.5
        for a, b in chain.items():
            head[tok.convert_tokens_to_ids(b), tok.convert_tokens_to_ids(a)] = 20.0
        model.get_output_embeddings().weight.copy_(head)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ext_plugin():
    """pip-install the external test plugin for the session, uninstall it afterwards."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", str(EXT_PLUGIN)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    import importlib

    importlib.invalidate_caches()
    yield "ext_example"
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "metareason-ext-example"],
                   capture_output=True, text=True)


def save_tiny_llama(path, **arch_overrides):
    """A tiny random Llama (TINY_LLAMA, with ``arch_overrides``) and the char tokenizer, saved
    at ``path`` like any Hugging Face model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareason.models import build_char_tokenizer

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    arch = dict(TINY_LLAMA, **arch_overrides)
    cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **arch)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with the char tokenizer, saved like any Hugging Face model."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face directory (``metareason models get``), converted once
    per machine: cached under ~/.cache/metareason/models, or ``$METAREASON_MODELS`` when set."""
    from metareason.models.pretrained import ensure_model

    return ensure_model("smollm2-135m-instruct")


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no tests is a failure, never a silent pass (pytest's exit 5)."""
    if exitstatus == 5:
        session.exitstatus = 1


@pytest.fixture
def kernel_run_calls(monkeypatch):
    """``Kernel.run`` still trains; the list records each call's ``resume``."""
    from metareason import Kernel

    calls = []
    real_run = Kernel.run

    def spy(self, resume=False, overwrite=False):
        calls.append(resume)
        return real_run(self, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(Kernel, "run", spy)
    return calls
