"""Durable checkpoints: safetensors weights (or PEFT adapters), optimizer, scheduler, RNG states
and data position.

The save protocol leaves at least one complete checkpoint at every instant, and every
``checkpoints/step-NNNNNNN`` directory is complete:

1. write every file into a fresh ``.tmp-step-N-*`` directory next to its final place;
2. fsync each file and the directory, then rename it to ``step-N`` and fsync ``checkpoints/``;
   a re-save of an existing step first renames the old copy to ``.old-step-N-*`` (kept complete
   until the new one is in place, then removed);
3. prune to the newest ``keep_last``: each older one is renamed to ``.del-step-N-*``, then removed.

A crash at any point leaves the previous checkpoint (or the new one) as it was.
:func:`clean_partial` (on ``--resume``) puts an ``.old-step-N`` back when ``step-N`` is missing (a
crash between the two renames of a re-save) and removes the other leftovers. Optimizer/scheduler/RNG
states are loaded with ``torch.load(weights_only=True)``; trainer state is JSON.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from metareason import durable

STEP_DIR = re.compile(r"^step-(\d+)$")
OLD_DIR = re.compile(r"^\.old-step-(\d+)-")
PARTIAL_PREFIXES = (".tmp-step-", ".old-step-", ".del-step-")
TRAINER_STATE = "trainer_state.json"
OPTIM_STATE = "optimizer.pt"
SCHED_STATE = "scheduler.pt"
RNG_STATE = "rng.pt"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The points of the save protocol, in order. ``fault_point`` (tests only) is called at each with
# ``(point, step)``: the fault-injection test stops the process there and kills it.
SAVE_POINTS = ("tmp-created", "written", "synced", "old-moved", "renamed", "old-removed", "pruning", "pruned")
fault_point: Optional[Callable[[str, int], None]] = None


def _at(point: str, step: int) -> None:
    if fault_point is not None:
        fault_point(point, step)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict,
                    keep_last: int, write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically; prune to the newest ``keep_last``.

    ``write_extra(directory)`` may add files of its own (e.g. the RL loop's rollout buffer);
    they are part of the same atomic rename.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=root))
    old = None
    try:
        _at("tmp-created", step)
        write_weights(model, tokenizer, tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIM_STATE)
        torch.save(scheduler.state_dict(), tmp / SCHED_STATE)
        torch.save(rng_state(), tmp / RNG_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(dict(trainer_state, step=step), indent=2))
        if write_extra is not None:
            write_extra(tmp)
        _at("written", step)
        durable.fsync_tree(tmp)
        _at("synced", step)
        if final.exists():  # re-saving a step (e.g. the end of a resumed run): the old copy stays whole
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            durable.fsync_dir(root)
            _at("old-moved", step)
        os.rename(tmp, final)
        durable.fsync_dir(root)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _at("renamed", step)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _at("old-removed", step)
    _prune(root, [p for p in list_checkpoints(run_dir)[:-keep_last] if p != final], step)
    return final


def _prune(root: Path, doomed: list[Path], step: int) -> None:
    """Rename each to ``.del-*`` first, so that every ``step-N`` left is complete, then remove."""
    gone = []
    for p in doomed:
        target = root / f".del-{p.name}-{os.getpid()}"
        os.rename(p, target)
        gone.append(target)
    if gone:
        durable.fsync_dir(root)
        _at("pruning", step)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    _at("pruned", step)


def write_weights(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Safetensors through ``save_pretrained`` (adapters only for a PEFT model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {}
    if _uses_trainable_tokens(model):
        # the trained rows are in the adapter (peft TrainableTokens): never the whole resized matrix
        kwargs["save_embedding_layers"] = False
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def _uses_trainable_tokens(model: torch.nn.Module) -> bool:
    for cfg in (getattr(model, "peft_config", None) or {}).values():
        if str(getattr(cfg, "peft_type", "")).endswith("TRAINABLE_TOKENS") or getattr(cfg, "trainable_token_indices", None):
            return True
    return False


def clean_partial(run_dir: Path) -> None:
    """Finish what a crash during a save left: an ``.old-step-N`` whose ``step-N`` is missing is
    the only complete copy of that step and is renamed back; every other ``.tmp-``, ``.old-`` and
    ``.del-`` directory is removed."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        m = OLD_DIR.match(p.name)
        if m and p.is_dir() and not (root / f"step-{m.group(1)}").exists():
            os.rename(p, root / f"step-{m.group(1)}")
            durable.fsync_dir(root)
    for p in root.iterdir():
        if p.name.startswith(PARTIAL_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


def holds_checkpoints(run_dir: Path) -> bool:
    """A complete checkpoint is there (or one that :func:`clean_partial` puts back)."""
    root = checkpoints_dir(run_dir)
    return bool(list_checkpoints(run_dir)) or (root.is_dir() and any(OLD_DIR.match(p.name) for p in root.iterdir()))


def load_weights_into(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into an already-built model (same architecture)."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_training_state(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    optimizer.load_state_dict(torch.load(path / OPTIM_STATE, weights_only=True))
    scheduler.load_state_dict(torch.load(path / SCHED_STATE, weights_only=True))
    set_rng_state(torch.load(path / RNG_STATE, weights_only=True))
    return json.loads((path / TRAINER_STATE).read_text())
