"""``metareason export RUN_DIR --out DIR [--checkpoint DIR] [--merge]``: a run's checkpoint as a
standard Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained(DIR)`` and a run
config's ``model.path: DIR`` both load.

* A full fine-tune: the weights and the tokenizer.
* A LoRA/QLoRA run with ``--merge``: the adapter merged into the base weights (one plain model).
* A LoRA/QLoRA run without ``--merge``: base weights (with the run's added tokens) plus the PEFT
  adapter in the same directory; ``adapter_config.json`` names that directory as its base (an
  absolute path: after moving the directory, export again or edit ``base_model_name_or_path``).
  Loading it needs ``peft``, which transformers uses to apply the adapter.

QLoRA trains an adapter over 4-bit weights; the export rebuilds the base unquantised in
``model.quantization.compute_dtype`` and puts the adapter on that (merged or not), as is usual.
The directory is written next to ``--out``, fsynced (files and directory) and renamed into place
when complete, so a crash or power loss leaves no partial or empty export at ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from metareason import durable
from metareason.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.add_argument("--checkpoint", help="a checkpoint directory of the run (default: the latest)")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default: the run's model.dtype)")


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, merge=args.merge, dtype=args.dtype)
    print(f"exported {args.run_dir} -> {out}")
    return 0


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out}: exists and is not an empty directory")


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | None = None, merge: bool = False,
               dtype: str | None = None) -> Path:
    import torch

    from metareason.checkpoint import write_weights
    from metareason.models.loader import DTYPES
    from metareason.trained import load_trained, run_config_file

    out = Path(out).resolve()
    _check_out(out)
    overrides = ["quiet=true", "model.gradient_checkpointing=false", "model.device=cpu"]
    from metareason.config import load_config
    from metareason.run_plugins import read_run_config

    cfg = run_config_file(Path(run_dir))
    config, _ = load_config(data=read_run_config(Path(run_dir), cfg, note=False), overrides=overrides, source=str(cfg))
    model_cfg = config.model
    quantized = model_cfg.quantization.load_in_4bit
    if quantized:  # rebuild the base unquantised; the adapter's keys are the same
        overrides += ["model.quantization.load_in_4bit=false", f"model.dtype={model_cfg.quantization.compute_dtype}"]
    trained = load_trained(run_dir, checkpoint, overrides)
    model, tokenizer = trained.model, trained.tokenizer
    if dtype is not None:
        model.to(DTYPES[dtype])
    is_peft = hasattr(model, "peft_config")

    with durable.atomic_dir(out) as tmp:  # an empty ``out`` (checked above) is replaced
        with torch.no_grad():
            if not is_peft:
                write_weights(model, tokenizer, tmp)
            elif merge:
                write_weights(model.merge_and_unload(), tokenizer, tmp)
            else:
                write_weights(model, tokenizer, tmp)  # adapter_config.json + adapter_model.safetensors
                base = model.unload()  # the base without LoRA layers (unmerged)
                base.save_pretrained(str(tmp), safe_serialization=True)
                adapter_cfg = tmp / "adapter_config.json"
                data = json.loads(adapter_cfg.read_text())
                data["base_model_name_or_path"] = str(out)
                adapter_cfg.write_text(json.dumps(data, indent=2))
        (tmp / "metareason_export.json").write_text(json.dumps({
            "run_dir": str(Path(run_dir)), "checkpoint": str(trained.checkpoint), "step": trained.step,
            "merged": bool(is_peft and merge), "adapter": bool(is_peft and not merge),
            "base_dequantized": bool(quantized)}, indent=2))
    return out
