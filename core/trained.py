"""A trained model back from its run directory: the run's config, plugins and seed, then the
weights of one checkpoint (full weights, or a PEFT adapter on the re-built base).

Used by ``metareason eval``, ``export`` and ``serve``. The run's config is read as
:mod:`metareason.run_plugins` says: sections of plugins that are gone and that the run did not
enable are ignored. Seeding before the build matters for runs whose base is a random init
(``model.arch``) trained with LoRA: the checkpoint holds only the adapter, and the same seed gives
back the same base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from metareason.errors import UserError


@dataclass
class Trained:
    kernel: Any
    model: Any
    tokenizer: Any
    checkpoint: Path
    step: int


def run_config_file(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run directory")
    cfg = run_dir / "config.yaml"
    if not run_dir.is_dir() or not cfg.exists():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return cfg


def resolve_checkpoint(run_dir: Path, checkpoint: Optional[str]) -> Path:
    from metareason.checkpoint import latest_checkpoint

    if checkpoint:
        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise UserError(f"--checkpoint: {checkpoint}: no such checkpoint directory")
        return ckpt
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint (train first, or pass --checkpoint)")
    return ckpt


def load_trained(run_dir: str | Path, checkpoint: Optional[str] = None, overrides: Sequence[str] = ()) -> Trained:
    """Kernel, model (eval mode not set) and tokenizer of ``run_dir`` at ``checkpoint`` (default: latest)."""
    from metareason.checkpoint import load_weights_into
    from metareason.kernel import Kernel
    from metareason.run_plugins import read_run_config
    from metareason.train.loop import seed_everything

    run_dir = Path(run_dir)
    cfg = run_config_file(run_dir)
    kernel = Kernel(read_run_config(run_dir, cfg), overrides=list(overrides), source=str(cfg))
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    seed_everything(kernel.config.train.seed)
    model, tokenizer = kernel.load()
    try:
        load_weights_into(model, ckpt)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{ckpt}: cannot load weights: {exc}") from None
    state = ckpt / "trainer_state.json"
    step = json.loads(state.read_text()).get("step", 0) if state.exists() else 0
    return Trained(kernel, model, tokenizer, ckpt, step)
