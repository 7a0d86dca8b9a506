"""SFT loop against Hugging Face Trainer: tokens/s and peak memory on the same model and data.

Both sides train the quickstart model architecture (random init, same seed) on the same
tokenised causal-loop examples with the same batch size, learning rate, schedule and
length grouping (``train.group_by_length``; Trainer's ``group_by_length``). Each side
runs in its own subprocess (so peak memory is its own) one after the other in this command, and
times the optimizer steps after a warm-up through a step-end hook (ours) or a
``TrainerCallback`` (Trainer). Tokens are non-padding tokens of the batches actually consumed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from metareason.benchmarks import cpu_name, peak_mb

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(QUICKSTART), help="run config whose model/data are used")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/train-cpu.json")
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)  # child process


def _kernel(args, tmp):
    from metareason.kernel import Kernel

    total = args.steps + args.warmup
    return Kernel(args.config, overrides=[
        f"output_dir={tmp}", "name=bench", f"train.max_steps={total}", f"train.batch_size={args.batch_size}",
        "train.grad_accum=1", "train.save_every=0", "train.eval_every=0", "eval.at_end=false",
        f"train.log_every={total}", "quiet=true",
    ])


def _side_ours(args, tmp) -> dict:
    from metareason.hookspecs import hookimpl

    kernel = _kernel(args, tmp)
    stamps: list[float] = []

    class Timer:
        @hookimpl
        def metareason_on_step_end(self, step, metrics):
            stamps.append(time.perf_counter())

    kernel.register(Timer(), name="bench_timer")
    tokens: list[int] = []
    from metareason.data import tokenize as tk

    original = tk.SFTStream.next_batch

    def counting(self):
        batch = original(self)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    tk.SFTStream.next_batch = counting
    kernel.run()
    w = args.warmup
    return {"tokens_per_s": sum(tokens[w:]) / (stamps[-1] - stamps[w - 1]), "peak_mb": peak_mb(),
            "steps": len(stamps)}


def _side_hf(args, tmp) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from metareason.data.tokenize import collate, encode_examples
    from metareason.train.loop import load_train_examples, seed_everything

    kernel = _kernel(args, tmp)
    cfg = kernel.config
    seed_everything(cfg.train.seed)
    model, tokenizer = kernel.load()
    examples = load_train_examples(kernel)
    enc = encode_examples(tokenizer, [e["prompt"] for e in examples], [e["completion"] for e in examples],
                          cfg.data.max_length)
    dataset = [{"input_ids": ids, "plen": p} for ids, p in zip(enc.input_ids, enc.prompt_lengths)]
    tokens: list[int] = []

    def collator(rows):
        batch = collate([r["input_ids"] for r in rows], [r["plen"] for r in rows], tokenizer.pad_token_id)
        tokens.append(int(batch["attention_mask"].sum()))
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["labels"]}

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    tc = cfg.train
    targs = TrainingArguments(
        output_dir=str(Path(tmp) / "hf"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + args.warmup, learning_rate=tc.lr, weight_decay=tc.weight_decay,
        adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], lr_scheduler_type="cosine", warmup_steps=tc.warmup_steps,
        max_grad_norm=tc.max_grad_norm or 0.0, logging_steps=10_000, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, seed=tc.seed, **_grouping_kwargs(TrainingArguments, tc.group_by_length),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                      callbacks=[Timer()])
    trainer.train()
    w = args.warmup
    # the dataloader may prefetch one batch ahead; count only the batches of timed steps
    return {"tokens_per_s": sum(tokens[w: w + args.steps]) / (stamps[-1] - stamps[w - 1]),
            "peak_mb": peak_mb(), "steps": len(stamps)}


def _grouping_kwargs(training_args_cls, grouped: bool) -> dict:
    """Trainer's length grouping: ``group_by_length`` before transformers 5,
    ``train_sampling_strategy="group_by_length"`` from 5 on."""
    import inspect

    params = inspect.signature(training_args_cls.__init__).parameters
    if "train_sampling_strategy" in params:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def _child(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = _side_ours(args, tmp) if args.side == "ours" else _side_hf(args, tmp)
    print("RESULT " + json.dumps(result))
    return 0


def run(args) -> int:
    if args.side:
        return _child(args)
    import torch

    results = {}
    for side in ("ours", "hf"):
        cmd = [sys.executable, "-m", "metareason", "bench", "train", "--side", side, "--config", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        print(f"[bench train] {side}: {args.warmup} warm-up + {args.steps} timed steps ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, METAREASON_PLUGINS="builtin"))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"error: bench train: the {side} side failed", file=sys.stderr)
            return 1
        results[side] = json.loads(lines[-1][len("RESULT "):])
    ratio_speed = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    ratio_mem = results["ours"]["peak_mb"] / results["hf"]["peak_mb"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()} ({os.cpu_count()} cores)"
    print(f"{'':10s} {'tokens/s':>10s} {'peak MB':>10s}")
    for side, name in (("ours", "metareason"), ("hf", "HF Trainer")):
        print(f"{name:10s} {results[side]['tokens_per_s']:10.0f} {results[side]['peak_mb']:10.0f}")
    print(f"speed ratio (ours / Trainer): {ratio_speed:.2f}x; peak memory ratio: {ratio_mem:.2f}x")
    record = {"benchmark": "train", "device": device, "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": args.config,
              "batch_size": args.batch_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
              "ours": results["ours"], "hf_trainer": results["hf"],
              "speed_ratio": ratio_speed, "peak_memory_ratio": ratio_mem,
              "command": "metareason bench train " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (
                  ("steps", args.steps), ("warmup", args.warmup), ("batch_size", args.batch_size)))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0
