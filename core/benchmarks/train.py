"""SFT loop against Hugging Face Trainer: tokens/s and peak memory on the same model and data.

Both sides train the quickstart model architecture (random init, same seed) on the same
tokenised causal-loop examples, in the same batches and the same order: the batches are our
``SFTStream``'s (with ``train.group_by_length``), handed to Trainer as a dataset in that order
with its sequential sampler, so each Trainer step sees exactly our step's examples. Same batch
size, learning rate, schedule, clipping, seed.

Sides (each in its own subprocess, so peak memory is its own):

* ``ours``: ``metareason run`` on the config with ``train.packing`` from ``--packing`` and
  ``train.lean_activations`` from ``--lean-activations``; the record names what each of
  ``train.packing``, ``train.fused_ce`` and ``train.lean_activations`` resolved to.
* ``hf_flatten``: Trainer with ``DataCollatorWithFlattening`` (its padding-free collator: the
  batch's examples in one row, position ids restarting per example).
* ``hf_padded``: Trainer with a right-padding collator; with length-grouped batches (the
  default) this is its ``group_by_length`` setting (our grouped batches are the same
  low-padding batches its length-grouped sampler aims for).

``--hf-mode`` picks the Trainer settings; the faster one (median tokens/s) is the baseline.
Runs are interleaved (ours, hf..., ours, hf..., ``--repeats`` times); each side reports the
median and range of its runs. Steps are timed after a warm-up through a step-end hook (ours)
or a ``TrainerCallback`` (Trainer). Tokens are the non-padding tokens of the timed steps'
batches (the same count on every side).

Peak step memory (``step_peak_mb``): one more, untimed step after the timed ones, on every side,
profiled from the previous step's end to its own: the peak of allocated tensor memory above what
was live when it began (activations, gradients, optimizer temporaries), from the PyTorch
profiler's allocation events on the CPU (``torch.cuda.max_memory_allocated`` on a GPU), not the
process RSS (``peak_mb``), which mostly counts imports.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from metareason.benchmarks import DEFAULT_OUT, cpu_name, peak_mb, relative_path, write_record
from metareason.configs import QUICKSTART

HF_MODES = {"flatten": ["hf_flatten"], "padded": ["hf_padded"], "both": ["hf_flatten", "hf_padded"]}
SIDE_NAMES = {"ours": "metareason", "hf_flatten": "HF Trainer, DataCollatorWithFlattening",
              "hf_padded": "HF Trainer, right-padding collator", "floor": "plain PyTorch loop (reference)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(QUICKSTART), help="run config whose model/data are used")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side; median and range reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    parser.add_argument("--packing", choices=["auto", "true", "false"], default="auto",
                        help="our side's train.packing")
    parser.add_argument("--lean-activations", choices=["auto", "true", "false"], default="auto",
                        help="our side's train.lean_activations")
    parser.add_argument("--group-by-length", choices=["config", "true", "false"], default="config",
                        help="length-grouped batches on every side (default: the config's train.group_by_length)")
    parser.add_argument("--hf-mode", choices=sorted(HF_MODES), default="both",
                        help="HF Trainer settings to run; the faster is the baseline")
    parser.add_argument("--out", default=f"{DEFAULT_OUT}/train-cpu.json", help="JSON record (and .md beside it)")
    parser.add_argument("--floor", action="store_true",
                        help="also run a plain PyTorch loop on the same batches (forward, loss, backward, clip, "
                             "fused AdamW, nothing else): what any loop's arithmetic costs, a reference, not a "
                             "baseline")
    parser.add_argument("--side", choices=list(SIDE_NAMES), help=argparse.SUPPRESS)  # child process


class StepMemory:
    """Peak allocated tensor memory (MiB) during the step after step index ``first`` (0-based),
    above what was live when it began: ``at_step_end(i)`` is called at every step end."""

    def __init__(self, first: int):
        self.first, self.prof, self.base, self.peak_mb = first, None, 0, None

    def at_step_end(self, i: int) -> None:
        import torch

        if i == self.first:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                self.prof = "cuda"
            else:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.prof.start()
        elif i == self.first + 1 and self.prof is not None:
            if self.prof == "cuda":
                torch.cuda.synchronize()
                self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
            else:
                self.prof.stop()
                events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                                if e.name() == "[memory]")
                live = peak = 0
                for _, nbytes in events:  # running sum of allocations (+) and frees (-)
                    live += nbytes
                    peak = max(peak, live)
                self.peak_mb = peak / 2 ** 20
            self.prof = None


def _total_steps(args) -> int:
    """Warm-up, timed steps, and the untimed step whose memory is profiled."""
    return args.warmup + args.steps + 1


def _kernel(args, tmp):
    from metareason.kernel import Kernel

    total = _total_steps(args)
    return Kernel(args.config, overrides=[
        f"output_dir={tmp}", "name=bench", f"train.max_steps={total}", f"train.batch_size={args.batch_size}",
        "train.grad_accum=1", "train.save_every=0", "train.eval_every=0", "eval.at_end=false",
        f"train.log_every={total}", "quiet=true", f"train.packing={args.packing}",
        f"train.lean_activations={args.lean_activations}",
    ] + ([] if args.group_by_length == "config" else [f"train.group_by_length={args.group_by_length}"]))


def _window(stamps: list[tuple[float, float]], tokens: list[int], w: int, steps: int) -> dict:
    """Tokens/s over the timed steps ``w+1 .. w+steps`` (``stamps``: (wall, CPU) at step ends)."""
    n = sum(tokens[w: w + steps])
    wall = stamps[w + steps - 1][0] - stamps[w - 1][0]
    cpu = stamps[w + steps - 1][1] - stamps[w - 1][1]
    return {"tokens_per_s": n / wall, "tokens_per_cpu_s": n / cpu, "timed_tokens": n, "timed_s": wall}


def _side_ours(args, tmp) -> dict:
    from metareason.data import tokenize as tk
    from metareason.hookspecs import hookimpl

    kernel = _kernel(args, tmp)
    stamps: list[tuple[float, float]] = []
    memory = StepMemory(args.warmup + args.steps - 1)

    class Timer:
        @hookimpl
        def metareason_on_step_end(self, step, metrics):
            stamps.append((time.perf_counter(), time.process_time()))
            memory.at_step_end(len(stamps) - 1)

    kernel.register(Timer(), name="bench_timer")
    tokens: list[int] = []
    original = tk.SFTStream.next_batch

    def counting(self):
        batch = original(self)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    tk.SFTStream.next_batch = counting
    from metareason.train import sft

    seen = {"line": None, "packed": 0}
    real_mode, real_pack = sft.packing_mode, sft.pack_batch

    def mode(*a, **k):
        on, seen["line"] = real_mode(*a, **k)
        return on, seen["line"]

    def pack(*a, **k):
        seen["packed"] += 1
        return real_pack(*a, **k)

    def recorded(key, real):
        def wrapper(*a, **k):
            on, seen[key] = real(*a, **k)
            return on, seen[key]
        return wrapper

    sft.packing_mode, sft.pack_batch = mode, pack
    sft.fused_ce_mode = recorded("fused_ce", sft.fused_ce_mode)
    sft.lean_activations_mode = recorded("lean_activations", sft.lean_activations_mode)
    kernel.run(overwrite=True)
    return {**_window(stamps, tokens, args.warmup, args.steps), "peak_mb": peak_mb(), "steps": len(stamps),
            "step_peak_mb": memory.peak_mb, "packing": seen["line"], "packed_batches": seen["packed"], "batches": len(tokens),
            "fused_ce": seen.get("fused_ce"), "lean_activations": seen.get("lean_activations"),
            "group_by_length": kernel.config.train.group_by_length}


def _our_batches(kernel, tokenizer, n_batches: int):
    """The examples (as encoded) of our stream's first ``n_batches`` batches, in order."""
    from metareason.data.tokenize import SFTStream
    from metareason.train.loop import load_train_examples
    from metareason.train.sft import encode_sft_examples

    cfg = kernel.config
    examples = load_train_examples(kernel)
    enc = encode_sft_examples(kernel, tokenizer, examples)  # as the loop encodes (chat template, EOS)
    stream = SFTStream(examples, enc, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id,
                       cfg.train.group_by_length)
    rows = []
    for _ in range(n_batches):
        epoch, b = divmod(stream.position // stream.batch_size, stream.batches_per_epoch)
        rows += [{"input_ids": enc.input_ids[i], "plen": enc.prompt_lengths[i]}
                 for i in stream._batches_for(epoch)[b]]
        stream.position += stream.batch_size
    return rows


def _side_hf(args, tmp, flatten: bool) -> dict:
    import torch
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from metareason.data.tokenize import collate
    from metareason.train.loop import seed_everything

    kernel = _kernel(args, tmp)
    cfg = kernel.config
    seed_everything(cfg.train.seed)
    model, tokenizer = kernel.load()
    total = _total_steps(args)
    dataset = _our_batches(kernel, tokenizer, total + 1)  # +1: the dataloader may prefetch a batch
    tokens: list[int] = []
    flattener = DataCollatorWithFlattening(return_position_ids=True)

    def collator(rows):
        tokens.append(sum(len(r["input_ids"]) for r in rows))
        if flatten:
            feats = []
            for r in rows:
                labels = list(r["input_ids"])
                labels[: r["plen"]] = [-100] * r["plen"]
                feats.append({"input_ids": r["input_ids"], "labels": labels})
            return flattener(feats)
        batch = collate([r["input_ids"] for r in rows], [r["plen"] for r in rows], tokenizer.pad_token_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["labels"]}

    stamps: list[tuple[float, float]] = []
    memory = StepMemory(args.warmup + args.steps - 1)

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))
            memory.at_step_end(len(stamps) - 1)

    tc = cfg.train
    targs = TrainingArguments(
        output_dir=str(Path(tmp) / "hf"), per_device_train_batch_size=args.batch_size,
        max_steps=total, learning_rate=tc.lr, weight_decay=tc.weight_decay,
        adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], lr_scheduler_type="cosine", warmup_steps=tc.warmup_steps,
        max_grad_norm=tc.max_grad_norm or 0.0, logging_steps=10_000, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, seed=tc.seed, **_sequential_kwargs(TrainingArguments),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                      callbacks=[Timer()])
    trainer.train()
    # the dataloader may prefetch one batch ahead; only the timed steps' batches are counted
    return {**_window(stamps, tokens, args.warmup, args.steps), "peak_mb": peak_mb(), "steps": len(stamps),
            "step_peak_mb": memory.peak_mb, "collator": "DataCollatorWithFlattening" if flatten else "right padding",
            "group_by_length": cfg.train.group_by_length,
            "attn_implementation": model.config._attn_implementation}


def _side_floor(args, tmp) -> dict:
    """The same model, batches (right-padded, no mask: causal attention never reads the padding
    of a right-padded row), loss and optimizer as ours, in a bare loop."""
    import torch
    import torch.nn.functional as F

    from metareason.data.tokenize import collate
    from metareason.train.loop import seed_everything
    from metareason.train.optim import build_optimizer

    kernel = _kernel(args, tmp)
    cfg = kernel.config
    seed_everything(cfg.train.seed)
    model, tokenizer = kernel.load()
    model.train()
    total = _total_steps(args)
    rows = _our_batches(kernel, tokenizer, total)
    memory = StepMemory(args.warmup + args.steps - 1)
    optimizer = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    stamps, tokens = [], []
    for i in range(total):
        chunk = rows[i * args.batch_size: (i + 1) * args.batch_size]
        batch = collate([r["input_ids"] for r in chunk], [r["plen"] for r in chunk], tokenizer.pad_token_id)
        tokens.append(int(batch["attention_mask"].sum()))
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=-100)
        loss.backward()
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append((time.perf_counter(), time.process_time()))
        memory.at_step_end(len(stamps) - 1)
    return {**_window(stamps, tokens, args.warmup, args.steps), "peak_mb": peak_mb(), "steps": len(stamps),
            "step_peak_mb": memory.peak_mb, "group_by_length": cfg.train.group_by_length}


def _sequential_kwargs(training_args_cls) -> dict:
    """Trainer reads the dataset in order: ``train_sampling_strategy="sequential"`` from
    transformers 5 on; before, a sequential sampler is not an argument (the bench needs 5)."""
    import inspect

    params = inspect.signature(training_args_cls.__init__).parameters
    if "train_sampling_strategy" not in params:
        raise SystemExit("bench train needs transformers >= 5 (TrainingArguments.train_sampling_strategy)")
    return {"train_sampling_strategy": "sequential"}


def _child(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "ours":
            result = _side_ours(args, tmp)
        elif args.side == "floor":
            result = _side_floor(args, tmp)
        else:
            result = _side_hf(args, tmp, flatten=args.side == "hf_flatten")
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))
    return 0


def _summary(runs: list[dict]) -> dict:
    speeds = [r["tokens_per_s"] for r in runs]
    mems = [r["peak_mb"] for r in runs]
    steps_mem = [r["step_peak_mb"] for r in runs]
    cpu = [r["tokens_per_cpu_s"] for r in runs]
    settings = {k: v for k, v in runs[0].items() if k in ("packing", "packed_batches", "batches", "collator",
                                                           "attn_implementation", "threads", "group_by_length",
                                                           "fused_ce", "lean_activations")}
    return {"tokens_per_s": statistics.median(speeds), "tokens_per_s_range": [min(speeds), max(speeds)],
            "tokens_per_cpu_s": statistics.median(cpu), "peak_mb": statistics.median(mems),
            "peak_mb_range": [min(mems), max(mems)], "step_peak_mb": statistics.median(steps_mem),
            "step_peak_mb_range": [min(steps_mem), max(steps_mem)], "timed_tokens": runs[0]["timed_tokens"], **settings,
            "runs": runs}


def _command(args) -> str:
    return "metareason bench train " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in (
        "steps", "warmup", "batch_size", "repeats", "threads", "packing", "lean_activations", "group_by_length",
        "hf_mode")) + \
        (" --floor" if args.floor else "") + \
        ("" if args.config == str(QUICKSTART) else f" --config {args.config}")


def run(args) -> int:
    if args.side:
        return _child(args)
    import torch
    import transformers

    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        print("error: --warmup, --steps and --repeats must be at least 1", file=sys.stderr)
        return 2
    sides = ["ours", *HF_MODES[args.hf_mode]] + (["floor"] if args.floor else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        for side in sides:
            cmd = [sys.executable, "-m", "metareason", "bench", "train", "--side", side, "--config", args.config]
            for k in ("steps", "warmup", "batch_size", "threads", "packing", "lean_activations", "group_by_length"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            print(f"[bench train] {side} (run {rep + 1}/{args.repeats}): {args.warmup} warm-up + {args.steps} "
                  f"timed steps ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, METAREASON_PLUGINS="builtin"))
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"error: bench train: the {side} side failed", file=sys.stderr)
                return 1
            runs[side].append(json.loads(lines[-1][len("RESULT "):]))
    load_after = os.getloadavg()
    results = {side: _summary(r) for side, r in runs.items()}
    counts = {side: r["timed_tokens"] for side, r in results.items()}
    if len(set(counts.values())) != 1:
        print(f"error: bench train: the sides counted different tokens {counts}", file=sys.stderr)
        return 1
    hf_sides = [s for s in sides if s.startswith("hf_")]
    baseline = max(hf_sides, key=lambda s: results[s]["tokens_per_s"])
    ours, base = results["ours"], results[baseline]
    ratio = ours["tokens_per_s"] / base["tokens_per_s"]
    pair_ratios = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(runs["ours"], runs[baseline])]
    mem_ratio = ours["peak_mb"] / base["peak_mb"]
    step_mem_ratio = ours["step_peak_mb"] / base["step_peak_mb"]
    cpu_ratio = ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
    print(f"{'':42s} {'tokens/s':>9s} {'range':>15s} {'tok/CPU-s':>9s} {'RSS MB':>8s} {'step MiB':>8s}")
    for side in sides:
        r = results[side]
        lo, hi = r["tokens_per_s_range"]
        print(f"{SIDE_NAMES[side]:42s} {r['tokens_per_s']:9.0f} {lo:7.0f}-{hi:<7.0f} {r['tokens_per_cpu_s']:9.0f} "
              f"{r['peak_mb']:8.0f} {r['step_peak_mb']:8.0f}")
    print(f"speed ratio (ours / {SIDE_NAMES[baseline]}): {ratio:.2f}x median (per-repeat {min(pair_ratios):.2f}-"
          f"{max(pair_ratios):.2f}), {cpu_ratio:.2f}x per CPU second; peak step memory (allocated tensors) ratio {step_mem_ratio:.2f}x, "
          f"peak RSS ratio {mem_ratio:.2f}x")
    floor = None
    if "floor" in results:
        f_cpu = results["floor"]["tokens_per_cpu_s"]
        floor = {"ours": ours["tokens_per_cpu_s"] / f_cpu, baseline: base["tokens_per_cpu_s"] / f_cpu}
        print(f"per CPU second against the plain loop: ours {floor['ours']:.2f}x, "
              f"{SIDE_NAMES[baseline]} {floor[baseline]:.2f}x")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()} ({os.cpu_count()} cores)"
    record = {"benchmark": "train", "device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": relative_path(args.config),
              "batch_size": args.batch_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
              "repeats": args.repeats, "threads": args.threads, "order": "interleaved: " + ", ".join(sides),
              "load_average_before": load_before, "load_average_after": load_after,
              "ours": ours, **{side: results[side] for side in sides if side != "ours"}, "baseline": baseline,
              "speed_ratio": ratio, "speed_ratio_range": [min(pair_ratios), max(pair_ratios)],
              "cpu_time_speed_ratio": cpu_ratio, "peak_memory_ratio": mem_ratio,
              "step_memory_ratio": step_mem_ratio, "command": _command(args),
              "against_plain_loop": floor}
    write_record(args.out, record, _markdown(record, sides))
    return 0


def _markdown(r: dict, sides: list[str]) -> str:
    lines = [f"# SFT loop: metareason vs Hugging Face Trainer (transformers {r['transformers']})", "",
             f"{r['device']}, torch {r['torch']}, {r['date']}.", "",
             f"Model of `{r['config']}`, the same batches in the same order on "
             f"every side (batch {r['batch_size']}, {'length-grouped' if r['ours']['group_by_length'] else 'random'}"
             f"), {r['timed_steps']} timed steps after "
             f"{r['warmup_steps']} warm-up; each side in its own process; {r['repeats']} interleaved run(s) per "
             f"side: median and range. Tokens are non-padding tokens. Load average (1 min) before/after: "
             f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f}; torch threads per side: "
             f"{r['ours'].get('threads')}.", "",
             "| side | settings | tokens/s (median) | range | tokens/CPU-s | peak step MiB (allocated) | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for side in sides:
        x = r[side]
        if side == "ours":
            settings = "; ".join([f"{x['packing']}; {x['packed_batches']} of {x['batches']} batches packed"]
                                 + [x[k] for k in ("fused_ce", "lean_activations") if x.get(k)])
        elif side == "floor":
            settings = "forward, loss, backward, clip, fused AdamW; right padding, no mask"
        else:
            settings = (f"{x['collator']}, {x['attn_implementation']} attention"
                        f"{', group_by_length' if x['group_by_length'] else ''}")
        lo, hi = x["tokens_per_s_range"]
        lines.append(f"| {SIDE_NAMES[side]} | {settings} | {x['tokens_per_s']:.0f} | {lo:.0f}-{hi:.0f} | "
                     f"{x['tokens_per_cpu_s']:.0f} | {x['step_peak_mb']:.0f} | {x['peak_mb']:.0f} |")
    lo, hi = r["speed_ratio_range"]
    lines += ["", f"Baseline: the faster Trainer setting, {SIDE_NAMES[r['baseline']]}. Speed ratio (ours / "
              f"baseline, medians): **{r['speed_ratio']:.2f}x** (per-repeat {lo:.2f}-{hi:.2f}); per CPU second "
              f"{r['cpu_time_speed_ratio']:.2f}x (the steadier number on a shared machine); peak step memory "
              f"(allocated tensors during one step, profiler) ratio **{r['step_memory_ratio']:.2f}x**; peak RSS "
              f"ratio {r['peak_memory_ratio']:.2f}x (mostly imports).", ""]
    if r.get("against_plain_loop"):
        f = r["against_plain_loop"]
        lines += [f"Against the plain PyTorch loop on the same batches (a reference for what the arithmetic "
                  f"alone costs; no loop does less), tokens per CPU second: ours {f['ours']:.2f}x, "
                  f"{SIDE_NAMES[r['baseline']]} {f[r['baseline']]:.2f}x.", ""]
    lines += [f"Command: `{r['command']}`", ""]
    return "\n".join(lines)
