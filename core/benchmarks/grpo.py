"""GRPO loop against TRL's ``GRPOTrainer``: optimizer-step time and peak memory, same work.

Both sides train the same randomly initialised model (the quickstart architecture unless
``--config`` names another run config; same seed) on the same causal-loop prompts (level 1:
one prompt length, so neither side pads prompts) with the same reward (fraction of digits),
group size, optimizer (fused AdamW, constant lr, clipping at 1.0), ``loss_type``, ``beta = 0``
and ``num_iterations = 1``. Every completion has exactly ``--completion-length`` tokens on both
sides (``min_new_tokens`` = ``max_new_tokens``, the pad token suppressed), so both generate and
train on the same number of tokens. TRL runs without gradient checkpointing (its default is on;
ours is off), without vLLM, in fp32, ``report_to=none``.

Each side runs in its own subprocess (so peak RSS is its own), one after the other in this
command; optimizer steps are timed after a warm-up through a step-end hook (ours) or a
``TrainerCallback`` (TRL).
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

from metareason.benchmarks import cpu_name, peak_mb, write_record
from metareason.hookspecs import hookimpl

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(QUICKSTART), help="run config whose model section is used")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion-length", type=int, default=64, help="tokens of every completion")
    parser.add_argument("--loss-type", default="dapo", choices=["grpo", "dr_grpo", "dapo"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sides", default="ours,trl,trl_gc",
                        help="comma list of sides: ours, trl (same work), trl_gc (TRL's default gradient checkpointing)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the sides this many times, interleaved; the median run of each side is reported")
    parser.add_argument("--out", default="bench/results/grpo-cpu.json")
    parser.add_argument("--side", choices=["ours", "trl", "trl_gc"], help=argparse.SUPPRESS)  # child process


def digit_fraction(completions, examples=None, **_):
    """The benchmark's reward: cheap, and the same function on both sides."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _step_times(stamps: list[tuple[float, float]], warmup: int, steps: int) -> dict:
    """Wall and process-CPU seconds per timed step (CPU time is steadier on a shared machine)."""
    (w0, c0), (w1, c1) = stamps[warmup - 1], stamps[-1]
    return {"step_s": (w1 - w0) / steps, "step_cpu_s": (c1 - c0) / steps}


def _kernel(args, tmp):
    from metareason.kernel import Kernel

    total = args.steps + args.warmup
    n = args.completion_length
    return Kernel(args.config, overrides=[
        f"output_dir={tmp}", "name=bench_grpo", "quiet=true", "train.algorithm=grpo",
        f"train.max_steps={total}", f"train.batch_size={args.prompts}", "train.grad_accum=1", f"train.lr={args.lr}",
        "train.warmup_steps=0", "train.schedule=constant", "train.weight_decay=0.0", "train.max_grad_norm=1.0",
        "train.save_every=0", "train.eval_every=0", f"train.log_every={total}", "eval.at_end=false",
        "data.train=[{task: causal_loop, num_samples: %d, seed: 0, params: {levels: [1]}}]" % (total * args.prompts),
        "data.eval=[]", f"rl.num_generations={args.num_generations}", "rl.rewards={bench_digit_fraction: 1.0}",
        f"rl.loss_type={args.loss_type}", "rl.beta=0.0", "rl.num_iterations=1", f"rl.max_completion_length={n}",
        f"generation.batch_size={args.prompts * args.num_generations}",
        "rl.generation_kwargs={min_new_tokens: %d}" % n,
    ])


class _BenchReward:
    @hookimpl
    def metareason_register_rewards(self, register):
        register("bench_digit_fraction", digit_fraction)


def _side_ours(args, tmp) -> dict:
    kernel = _kernel(args, tmp)
    kernel.register(_BenchReward(), name="bench_reward")
    stamps: list[float] = []
    parts: list[dict] = []

    class Timer:
        @hookimpl
        def metareason_on_step_end(self, step, metrics):
            stamps.append((time.perf_counter(), time.process_time()))
            parts.append({k: metrics[k] for k in ("rl/time/generate_s", "rl/time/rollout_s", "rl/time/train_s")})
            parts[-1]["tokens"] = metrics["rl/completion_length/mean"]

    kernel.register(Timer(), name="bench_timer")
    kernel.run()
    w = args.warmup
    timed = parts[w:]
    return {**_step_times(stamps, w, args.steps), "peak_mb": peak_mb(), "steps": len(stamps),
            "generate_s": sum(p["rl/time/generate_s"] for p in timed) / len(timed),
            "rollout_s": sum(p["rl/time/rollout_s"] for p in timed) / len(timed),
            "train_s": sum(p["rl/time/train_s"] for p in timed) / len(timed),
            "completion_tokens": sum(p["tokens"] for p in timed) / len(timed)}


def _side_trl(args, tmp, gradient_checkpointing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from metareason.train.grpo import load_train_examples
    from metareason.train.loop import seed_everything

    kernel = _kernel(args, tmp)
    cfg = kernel.config
    seed_everything(cfg.train.seed)
    model, tokenizer = kernel.load()
    examples = load_train_examples(kernel)
    dataset = Dataset.from_list([{"prompt": e["prompt"]} for e in examples])
    stamps: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    n = args.completion_length
    tc = cfg.train
    targs = GRPOConfig(
        output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=args.prompts * args.num_generations,
        gradient_accumulation_steps=1, num_generations=args.num_generations, max_completion_length=n,
        max_steps=args.steps + args.warmup, learning_rate=tc.lr, weight_decay=0.0, adam_beta1=tc.betas[0],
        adam_beta2=tc.betas[1], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        optim="adamw_torch_fused", loss_type=args.loss_type, beta=0.0, num_iterations=1, temperature=1.0,
        top_p=1.0, generation_kwargs={"min_new_tokens": n, "suppress_tokens": [tokenizer.pad_token_id]},
        gradient_checkpointing=gradient_checkpointing, use_cpu=not torch.cuda.is_available(), bf16=False, report_to="none",
        logging_steps=10_000, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=tc.seed,
    )

    def reward(completions, completion_ids=None, **kw):
        lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        return digit_fraction(completions)

    reward.__name__ = "digit_fraction"
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    w = args.warmup
    return {**_step_times(stamps, w, args.steps), "peak_mb": peak_mb(), "steps": len(stamps),
            "completion_tokens": sum(lengths[w:]) / len(lengths[w:])}


def _child(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "ours":
            result = _side_ours(args, tmp)
        else:
            result = _side_trl(args, tmp, gradient_checkpointing=args.side == "trl_gc")
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))
    return 0


def _median_run(rows: list[dict]) -> dict:
    """The run with the median wall step time; every run's step times kept alongside."""
    ordered = sorted(rows, key=lambda r: r["step_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(rows) > 1:
        out["all_step_s"] = [r["step_s"] for r in rows]
        out["all_step_cpu_s"] = [r["step_cpu_s"] for r in rows]
    return out


def _command(args) -> str:
    return "metareason bench grpo " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in (
        "steps", "warmup", "prompts", "num_generations", "completion_length", "loss_type", "lr", "threads", "repeats"))


def run(args) -> int:
    if args.side:
        return _child(args)
    import torch

    if args.warmup < 1 or args.steps < 1:
        print("error: --warmup and --steps must be at least 1", file=sys.stderr)
        return 2
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        for side in sides:
            cmd = [sys.executable, "-m", "metareason", "bench", "grpo", "--side", side, "--config", args.config]
            for k in ("steps", "warmup", "prompts", "num_generations", "completion_length", "loss_type", "lr",
                      "threads"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            print(f"[bench grpo] {side} (run {rep + 1}/{args.repeats}): {args.warmup} warm-up + {args.steps} timed "
                  f"steps ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, METAREASON_PLUGINS="builtin"))
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"error: bench grpo: the {side} side failed", file=sys.stderr)
                return 1
            runs[side].append(json.loads(lines[-1][len("RESULT "):]))
    results = {side: _median_run(r) for side, r in runs.items()}
    print(f"{'':22s} {'step s':>8s} {'CPU s':>8s} {'peak MB':>9s} {'tokens':>7s}")
    for side, name in (("ours", "metareason"), ("trl", "TRL"), ("trl_gc", "TRL (grad. checkpt.)")):
        if side in results:
            r = results[side]
            print(f"{name:22s} {r['step_s']:8.3f} {r['step_cpu_s']:8.3f} {r['peak_mb']:9.0f} {r['completion_tokens']:7.1f}")
    if not {"ours", "trl"} <= set(results):
        return 0
    speedup = results["trl"]["step_s"] / results["ours"]["step_s"]
    cpu_speedup = results["trl"]["step_cpu_s"] / results["ours"]["step_cpu_s"]
    mem_ratio = results["ours"]["peak_mb"] / results["trl"]["peak_mb"]
    print(f"speed-up (TRL step time / ours): {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU time; "
          f"peak memory ratio (ours / TRL): {mem_ratio:.2f}x")
    extra = {}
    if "trl_gc" in results:
        extra = {"trl_gradient_checkpointing": results["trl_gc"],
                 "speedup_vs_trl_defaults": results["trl_gc"]["step_s"] / results["ours"]["step_s"],
                 "peak_memory_ratio_vs_trl_defaults": results["ours"]["peak_mb"] / results["trl_gc"]["peak_mb"]}
        print(f"against TRL with its default gradient checkpointing: {extra['speedup_vs_trl_defaults']:.2f}x, "
              f"peak memory {extra['peak_memory_ratio_vs_trl_defaults']:.2f}x")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()} ({os.cpu_count()} cores)"
    import transformers
    import trl

    record = {"benchmark": "grpo", "device": device, "torch": torch.__version__, "trl_version": trl.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": args.config,
              "prompts_per_step": args.prompts, "num_generations": args.num_generations,
              "completion_length": args.completion_length, "loss_type": args.loss_type,
              "timed_steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "ours": results["ours"], "trl": results["trl"],
              "speedup": speedup, "cpu_time_speedup": cpu_speedup, "peak_memory_ratio": mem_ratio, **extra,
              "command": _command(args)}
    out = Path(args.out)
    write_record(out, record, _markdown(record))
    return 0


def _markdown(r: dict) -> str:
    rows = [("metareason", r["ours"]), ("TRL GRPOTrainer", r["trl"])]
    if "trl_gradient_checkpointing" in r:
        rows.append(("TRL, gradient checkpointing (its default)", r["trl_gradient_checkpointing"]))
    lines = [f"# GRPO step: metareason vs TRL {r['trl_version']}", "",
             f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, {r['date']}.", "",
             f"Same model (quickstart architecture, random init), {r['prompts_per_step']} causal-loop prompts x "
             f"{r['num_generations']} completions of exactly {r['completion_length']} tokens per optimizer step, "
             f"loss_type {r['loss_type']}, beta 0, num_iterations 1; {r['timed_steps']} timed steps after "
             f"{r['warmup_steps']} warm-up; each side in its own process; {r['repeats']} interleaved run(s) per "
             f"side, the median reported. Load average before/after: "
             f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f}; torch threads per side: "
             f"{r['ours'].get('threads')} (on a shared machine the CPU-time column is the steadier one, and more "
             f"threads than free cores make OpenMP spin: use `--threads 1` there).", "",
             "| side | step (s, wall) | step (s, CPU) | peak RSS (MB) |", "|---|---|---|---|"]
    for name, x in rows:
        lines.append(f"| {name} | {x['step_s']:.3f} | {x['step_cpu_s']:.3f} | {x['peak_mb']:.0f} |")
    lines += ["", f"Speed-up (TRL step time / ours): **{r['speedup']:.2f}x** wall, {r['cpu_time_speedup']:.2f}x "
              f"CPU time; peak memory ours / TRL: {r['peak_memory_ratio']:.2f}x."]
    if "speedup_vs_trl_defaults" in r:
        lines.append(f"Against TRL with its default gradient checkpointing: {r['speedup_vs_trl_defaults']:.2f}x, "
                     f"peak memory {r['peak_memory_ratio_vs_trl_defaults']:.2f}x.")
    ours = r["ours"]
    lines += ["", f"Our step: sampling {ours['generate_s']:.3f} s (the model's `generate`, as TRL), rollout total "
              f"{ours['rollout_s']:.3f} s, optimizer step {ours['train_s']:.3f} s.", "",
              f"Command: `{r['command']}`", ""]
    return "\n".join(lines)
