"""Load tokenizers and causal LMs through Hugging Face's own APIs.

* From a local directory, offline (``local_files_only``): ``AutoTokenizer`` /
  ``AutoModelForCausalLM``; ``trust_remote_code`` only when the config sets it.
* From a GGUF file (``model.gguf_file`` in that directory, or ``model.path`` naming a ``.gguf``):
  transformers dequantises it into an ordinary model (needs the ``gguf`` package).
* From an architecture config (``model.arch``, random init) for from-scratch runs.
* QLoRA: 4-bit nf4 with double quantisation through bitsandbytes, then PEFT LoRA.

Every failure the user can cause (missing path, corrupt config.json, a tokenizer that does not
fit the model) is a ``ModelLoadError`` with one line naming the path.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from metareason.config import ModelConfig
from metareason.errors import ModelLoadError
from metareason.models.char_tokenizer import build_char_tokenizer
from metareason.models.special_tokens import SpecialToken, add_special_tokens, normalise, token_row_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"model.device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device: {device!r} requested but this torch sees no CUDA device")
    return dev


def _check_model_dir(path: str, field: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{field}: {path}: no such directory (models load from local paths only)")
    if not p.is_dir():
        raise ModelLoadError(f"{field}: {path}: not a directory")
    return p


def _check_config_json(p: Path, field: str) -> dict:
    cfg = p / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"{field}: {cfg}: missing (not a Hugging Face model directory)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{field}: {cfg}: corrupt JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"{field}: {cfg}: no 'model_type' field")
    return data


GGUF_MIN = "0.17.1"  # the gguf package (setup.py)
GGUF_MIN_TRANSFORMERS = "5.18"  # before it, a Llama GGUF's GPT-2-style tokenizer loads with eos = bos


def _gguf_available() -> bool:
    from transformers.utils.import_utils import is_gguf_available

    return is_gguf_available(GGUF_MIN)


def _gguf_transformers_error() -> Optional[str]:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(GGUF_MIN_TRANSFORMERS):
        return f"loading GGUF needs transformers >= {GGUF_MIN_TRANSFORMERS} (this is {transformers.__version__})"
    return None


def gguf_source(cfg: ModelConfig) -> Optional[tuple[Path, str, str]]:
    """``(directory, file name, config field)`` when the model is a GGUF file, else None.

    Either ``model.path`` is a directory and ``model.gguf_file`` names a file in it, or
    ``model.path`` names a ``.gguf`` file itself.
    """
    if cfg.path is None:
        if cfg.gguf_file:
            raise ModelLoadError("model.gguf_file: needs model.path (the directory that holds the file)")
        return None
    p = Path(cfg.path).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        if cfg.gguf_file and cfg.gguf_file != p.name:
            raise ModelLoadError(f"model.gguf_file: {cfg.gguf_file}: model.path already names a GGUF file ({cfg.path})")
        directory, name, field = p.parent, p.name, "model.path"
    elif cfg.gguf_file:
        directory, name, field = _check_model_dir(cfg.path, "model.path"), cfg.gguf_file, "model.gguf_file"
    else:
        return None
    if not (directory / name).is_file():
        raise ModelLoadError(f"{field}: {directory / name}: no such GGUF file")
    if not _gguf_available():
        raise ModelLoadError(f"{field}: {directory / name}: loading GGUF needs the gguf package "
                             f"(pip install 'gguf>={GGUF_MIN}')")
    old_transformers = _gguf_transformers_error()
    if old_transformers:
        raise ModelLoadError(f"{field}: {directory / name}: {old_transformers}")
    return directory, name, field


def _gguf_error(exc: Exception, field: str, file: Path, what: str) -> ModelLoadError:
    text = str(exc).strip()
    m = re.search(r"architecture (\S+) is not supported", text)
    if m:
        import transformers

        return ModelLoadError(f"{field}: {file}: GGUF architecture {m.group(1)!r} is not supported by "
                              f"transformers {transformers.__version__}")
    first = text.splitlines()[0] if text else type(exc).__name__
    return ModelLoadError(f"{field}: {file}: cannot load {what}: {first}")


def load_gguf_tokenizer(directory: Path, name: str, field: str = "model.gguf_file") -> Any:
    """The tokenizer stored in a GGUF file (its chat template included).

    transformers prefers a ``tokenizer.json`` beside the GGUF to the GGUF's own tokenizer, and then
    loses its special tokens; so the file is read from a directory of its own (a symlink to it).
    """
    from transformers import AutoTokenizer

    src = (directory / name).resolve()
    with tempfile.TemporaryDirectory(prefix="metareason-gguf-") as tmp:
        link = Path(tmp) / src.name
        try:
            link.symlink_to(src)
        except OSError:  # no symlinks here
            shutil.copyfile(src, link)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=src.name, local_files_only=True)
        except Exception as exc:
            raise _gguf_error(exc, field, directory / name, "tokenizer") from None
    tok.name_or_path = str(directory / name)
    return tok


def load_gguf_model(directory: Path, name: str, dtype: torch.dtype,
                    field: str = "model.gguf_file") -> torch.nn.Module:
    """A GGUF file's model, dequantised to ``dtype``: an ordinary model that trains and saves."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(gguf_file=name, local_files_only=True, dtype=dtype)
    try:  # transformers >= 5.24 may keep GGUF weights packed (for its kernels); we want them plain
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantise
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except Exception as exc:
        raise _gguf_error(exc, field, directory / name, "model") from None
    # the weights are dense now: drop the GGUF quantizer, which would refuse to train or save
    model.hf_quantizer = None
    for key in ("quantization_config", "_model_name_or_path"):
        if key in model.config.__dict__:
            delattr(model.config, key)
    packed = [n for n, t in model.named_parameters() if not t.is_floating_point()]
    if packed:
        raise ModelLoadError(f"{field}: {directory / name}: weights still packed after loading ({packed[0]})")
    return model


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The run's tokenizer; ``tokenizer.type: char`` builds (or loads) the character tokenizer."""
    path = cfg.tokenizer.path or cfg.path
    if cfg.tokenizer.type == "char" and path is None:
        return build_char_tokenizer()
    if path is None:
        raise ModelLoadError("model.tokenizer: set model.path, model.tokenizer.path, or model.tokenizer.type: char")
    field = "model.tokenizer.path" if cfg.tokenizer.path else "model.path"
    gguf = None if cfg.tokenizer.path else gguf_source(cfg)
    if gguf is not None:
        tok = load_gguf_tokenizer(*gguf)
    else:
        tok = _load_dir_tokenizer(cfg, path, field)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"{field}: {path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _load_dir_tokenizer(cfg: ModelConfig, path: str, field: str) -> Any:
    from transformers import AutoTokenizer

    p = _check_model_dir(path, field)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True,
                                            trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # transformers raises many types here; all mean "cannot load"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{field}: {path}: cannot load tokenizer: {first}") from None
    return tok


def _quantization_config(cfg: ModelConfig):
    q = cfg.quantization
    if not q.load_in_4bit:
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("model.quantization.load_in_4bit: needs bitsandbytes (pip install 'metareason[quant]')") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
    )


def _arch_error(exc: Exception, arch: dict, model_type: str, building: bool = False) -> str:
    """One line naming the ``model.arch`` field a config class rejected.

    transformers' config classes are huggingface_hub strict dataclasses ("Validation error for
    field 'x':" + the cause on the next line); ours raise ``ValueError("x: ...")``.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    m = re.match(r"Validation error for field '([^']+)'", lines[0])
    if m:
        detail = re.sub(r"^[A-Za-z]*Error: ", "", lines[1]) if len(lines) > 1 else lines[0]
        return f"model.arch.{m.group(1)}: {detail}"
    m = re.match(r"([A-Za-z_]\w*): (.+)", lines[0])
    if m and m.group(1) in arch:
        return f"model.arch.{m.group(1)}: {m.group(2)}"
    if building:
        return f"model.arch: cannot build {model_type!r}: {lines[0]}"
    if isinstance(exc, TypeError):
        return f"model.arch: {lines[0]}"
    return f"model.arch.model_type: {model_type!r}: {lines[0]}"


def build_model(cfg: ModelConfig, tokenizer: Any, device: torch.device) -> torch.nn.Module:
    """Instantiate the model (no special tokens, no PEFT yet)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    gguf = gguf_source(cfg)
    if gguf is not None:
        if cfg.quantization.load_in_4bit:
            raise ModelLoadError(f"model.quantization.load_in_4bit: not with a GGUF file ({gguf[0] / gguf[1]}); "
                                 "save it as a Hugging Face directory first (metareason models get, save_pretrained)")
        model = load_gguf_model(gguf[0], gguf[1], dtype, gguf[2])
    elif cfg.path is not None:
        p = _check_model_dir(cfg.path, "model.path")
        _check_config_json(p, "model.path")
        quant = _quantization_config(cfg)
        kwargs: dict[str, Any] = dict(local_files_only=True, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"model.path: {cfg.path}: cannot load model: {first}") from None
    elif cfg.arch is not None:
        if cfg.quantization.load_in_4bit:
            raise ModelLoadError("model.quantization.load_in_4bit: needs a pretrained model in model.path, not model.arch")
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type", None)
        if not model_type:
            raise ModelLoadError("model.arch.model_type: field required (e.g. llama)")
        arch.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                arch.setdefault(name, value)
        try:
            config = AutoConfig.for_model(model_type, **arch)
        except Exception as exc:  # unknown type, or a field the config class rejects (strict dataclasses)
            raise ModelLoadError(_arch_error(exc, arch, model_type)) from None
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
        except Exception as exc:
            raise ModelLoadError(_arch_error(exc, arch, model_type, building=True)) from None
    else:
        raise ModelLoadError("model: set model.path (a local Hugging Face model) or model.arch (random init)")

    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        where = cfg.tokenizer.path or cfg.path or "char tokenizer"
        raise ModelLoadError(
            f"model.tokenizer: {where} has {len(tokenizer)} tokens but the model has {rows} embedding rows (incompatible tokenizer)"
        )
    if not cfg.quantization.load_in_4bit:
        model.to(device)
    return model


def apply_lora(model: torch.nn.Module, cfg: ModelConfig, trainable_token_ids: Iterable[int] = ()) -> torch.nn.Module:
    """LoRA (after k-bit preparation for QLoRA); ``trainable_token_ids``: rows of the embedding
    (and of an untied output layer) trained beside it, e.g. tokens a plugin added for the model to write."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lc = cfg.lora
    ids = sorted(set(trainable_token_ids))
    peft_cfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        modules_to_save=lc.modules_to_save, task_type="CAUSAL_LM",
        trainable_token_indices=token_row_targets(model, ids) if ids else None,
    )
    return get_peft_model(model, peft_cfg)


def load_model(cfg: ModelConfig, tokenizer: Any, special_tokens: Iterable[Any] = (),
               device: Optional[torch.device] = None) -> tuple[torch.nn.Module, list[int]]:
    """Model ready for training: built, special tokens added, gradient checkpointing, LoRA.

    Returns ``(model, new_token_ids)``. Plugins' ``metareason_prepare_model`` runs after this
    (in ``Kernel.load``).
    """
    device = device or resolve_device(cfg.device)
    model = build_model(cfg, tokenizer, device)
    tokens = list(special_tokens) + [SpecialToken(t) for t in cfg.special_tokens]
    new_ids = add_special_tokens(tokenizer, model, tokens)
    trainable = [tokenizer.convert_tokens_to_ids(t.text) for t in normalise(tokens) if t.trainable]
    if cfg.gradient_checkpointing and not cfg.quantization.load_in_4bit:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled or cfg.quantization.load_in_4bit:
        if not cfg.lora.enabled:
            raise ModelLoadError("model.quantization.load_in_4bit: 4-bit weights cannot be trained; set model.lora.enabled: true")
        model = apply_lora(model, cfg, trainable)
    return model, new_ids
