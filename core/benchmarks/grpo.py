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
command, and with ``--repeats N`` the sides alternate N times (interleaved, so a change in the
machine's load hits both); the run with the median step time of each side is reported, with
the min-max over the runs. Optimizer steps are timed after a warm-up through a step-end hook
(ours) or a ``TrainerCallback`` (TRL). Each step is broken down the same way on both sides:

* sampling: the decode (ours: ``generate_batch``; TRL: ``GRPOTrainer._generate``),
* rest of rollout: rewards, advantages, tensors (the rollout minus sampling; TRL:
  ``_generate_and_score_completions``),
* log-prob forward: the training forward that gives the per-token log-probs (ours:
  ``LogProbs.__call__`` with gradients on; TRL: ``_get_per_token_logps_and_entropies`` with
  gradients on),
* backward + optimizer: the rest of the step (loss, backward, clipping, optimizer step).

The timers wrap those methods in the child process only; on CUDA they synchronize first.
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

from metareason.benchmarks import DEFAULT_OUT, cpu_name, peak_mb, relative_path, write_record
from metareason.configs import QUICKSTART
from metareason.hookspecs import hookimpl



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
                        help="comma list of sides: ours, ours_unshared (ours with rl.share_prompt_forward off: every "
                             "completion recomputes its prompt, as TRL does), trl (same work), trl_gc (TRL's default "
                             "gradient checkpointing)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the sides this many times, interleaved; the median run of each side is reported")
    parser.add_argument("--decoder", default="lean", choices=["lean", "lean_model", "hf"],
                        help="our side's sampling (generation.decoder): the lean decode loop with its own decode "
                             "step, the lean loop calling the model each step, or the model's generate")
    parser.add_argument("--lean-activations", default="auto", choices=["auto", "true", "false"],
                        help="our side's train.lean_activations (the record names what it resolved to)")
    parser.add_argument("--out", default=f"{DEFAULT_OUT}/grpo-cpu.json", help="JSON record (and .md beside it)")
    parser.add_argument("--side", choices=["ours", "ours_unshared", "trl", "trl_gc"],
                        help=argparse.SUPPRESS)  # child process


def digit_fraction(completions, examples=None, **_):
    """The benchmark's reward: cheap, and the same function on both sides."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _step_times(stamps: list[tuple[float, float]], warmup: int, steps: int) -> dict:
    """Wall and process-CPU seconds per timed step (CPU time is steadier on a shared machine)."""
    (w0, c0), (w1, c1) = stamps[warmup - 1], stamps[-1]
    return {"step_s": (w1 - w0) / steps, "step_cpu_s": (c1 - c0) / steps}


class _Timers:
    """Wall and process-CPU seconds spent in wrapped methods, cumulative per name; ``mark()`` at
    each step end."""

    def __init__(self):
        self.total: dict[str, tuple[float, float]] = {}
        self.marks: list[dict[str, tuple[float, float]]] = []

    def wrap(self, owner, name: str, key: str, when=None) -> None:
        """Time ``owner.name`` under ``key`` (only calls where ``when()`` holds, when given)."""
        import functools

        original = getattr(owner, name)
        timers = self

        @functools.wraps(original)
        def timed(*a, **k):
            if when is not None and not when():
                return original(*a, **k)
            _sync()
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*a, **k)
            finally:
                _sync()
                w, c = timers.total.get(key, (0.0, 0.0))
                timers.total[key] = (w + time.perf_counter() - w0, c + time.process_time() - c0)

        setattr(owner, name, timed)

    def mark(self) -> None:
        self.marks.append(dict(self.total))

    def per_step(self, key: str, warmup: int) -> tuple[float, float]:
        """Mean (wall, CPU) seconds per timed step (the steps after the warm-up)."""
        (w0, c0), (w1, c1) = self.marks[warmup - 1].get(key, (0.0, 0.0)), self.marks[-1].get(key, (0.0, 0.0))
        n = len(self.marks) - warmup
        return (w1 - w0) / n, (c1 - c0) / n


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _breakdown(times: dict, timers: _Timers, warmup: int) -> dict:
    """The step's parts (see the module docstring), wall and CPU seconds per step."""
    out = {}
    for i, suffix in ((0, "s"), (1, "cpu_s")):
        step = times["step_s" if i == 0 else "step_cpu_s"]
        sampling, rollout, logps = (timers.per_step(k, warmup)[i] for k in ("sampling", "rollout", "logps"))
        out.update({f"sampling_{suffix}": sampling, f"rollout_other_{suffix}": rollout - sampling,
                    f"logps_forward_{suffix}": logps, f"backward_optimizer_{suffix}": step - rollout - logps})
    return out


def _kernel(args, tmp, share_prompt_forward: bool = True):
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
        f"generation.batch_size={args.prompts * args.num_generations}", f"generation.decoder={args.decoder}",
        "rl.generation_kwargs={min_new_tokens: %d}" % n, f"rl.share_prompt_forward={str(share_prompt_forward).lower()}",
        f"train.lean_activations={args.lean_activations}",
    ])


class _BenchReward:
    @hookimpl
    def metareason_register_rewards(self, register):
        register("bench_digit_fraction", digit_fraction)


def _side_ours(args, tmp, share_prompt_forward: bool = True) -> dict:
    import torch

    from metareason.train import grpo

    kernel = _kernel(args, tmp, share_prompt_forward)
    kernel.register(_BenchReward(), name="bench_reward")
    stamps: list[float] = []
    parts: list[dict] = []
    import metareason.generation.generate

    timers = _Timers()
    timers.wrap(metareason.generation.generate, "generate_batch", "sampling")  # generate_rollout imports it per call
    timers.wrap(grpo, "generate_rollout", "rollout")
    timers.wrap(grpo.LogProbs, "__call__", "logps", when=torch.is_grad_enabled)

    class Timer:
        @hookimpl
        def metareason_on_step_end(self, step, metrics):
            stamps.append((time.perf_counter(), time.process_time()))
            timers.mark()
            parts.append({k: metrics[k] for k in ("rl/time/generate_s", "rl/time/rollout_s", "rl/time/train_s")})
            parts[-1]["tokens"] = metrics["rl/completion_length/mean"]
            parts[-1]["prompt_tokens"] = metrics["rl/prompt_length/mean"]

    kernel.register(Timer(), name="bench_timer")
    seen: dict = {}
    real_lean = grpo.lean_activations_mode

    def lean(*a, **k):
        on, seen["lean_activations"] = real_lean(*a, **k)
        return on, seen["lean_activations"]

    grpo.lean_activations_mode = lean
    try:
        kernel.run(overwrite=True)
    finally:
        grpo.lean_activations_mode = real_lean
    w = args.warmup
    timed = parts[w:]
    times = _step_times(stamps, w, args.steps)
    return {**times, "peak_mb": peak_mb(), "steps": len(stamps), "decoder": kernel.config.generation.decoder,
            "generate_s": sum(p["rl/time/generate_s"] for p in timed) / len(timed),
            "rollout_s": sum(p["rl/time/rollout_s"] for p in timed) / len(timed),
            "train_s": sum(p["rl/time/train_s"] for p in timed) / len(timed),
            **_breakdown(times, timers, w), "completion_tokens": sum(p["tokens"] for p in timed) / len(timed),
            "prompt_tokens": sum(p["prompt_tokens"] for p in timed) / len(timed),
            "share_prompt_forward": kernel.config.rl.share_prompt_forward,
            "lean_activations": seen.get("lean_activations")}


def _side_trl(args, tmp, gradient_checkpointing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from metareason.data.chat import needs_bos
    from metareason.train.grpo import load_train_examples
    from metareason.train.loop import seed_everything

    kernel = _kernel(args, tmp)
    cfg = kernel.config
    seed_everything(cfg.train.seed)
    model, tokenizer = kernel.load()
    examples = load_train_examples(kernel)
    # the prompt text our side generates from (the chat template when the run uses one), so both
    # sides compute on the same tokens; TRL applies no template to plain-string prompts
    fmt = kernel.chat_format(tokenizer)
    texts = [kernel.prompt_text(e, tokenizer, fmt) for e in examples]
    texts = [tokenizer.bos_token + t if needs_bos(tokenizer, t) else t for t in texts]  # ours adds it too
    dataset = Dataset.from_list([{"prompt": t} for t in texts])
    stamps: list[float] = []
    lengths: list[float] = []

    prompt_tokens: list[float] = []  # what TRL tokenised the prompts to (its own tokenizer call)
    score = GRPOTrainer._generate_and_score_completions

    def counted(self, *a, **k):
        out = score(self, *a, **k)
        prompt_tokens.append(float(out["prompt_mask"].sum(1).float().mean()))
        return out

    GRPOTrainer._generate_and_score_completions = counted
    timers = _Timers()
    timers.wrap(GRPOTrainer, "_generate", "sampling")
    timers.wrap(GRPOTrainer, "_generate_and_score_completions", "rollout")
    timers.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", "logps", when=torch.is_grad_enabled)

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))
            timers.mark()

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
    times = _step_times(stamps, w, args.steps)
    return {**times, "peak_mb": peak_mb(), "steps": len(stamps), **_breakdown(times, timers, w),
            "completion_tokens": sum(lengths[w:]) / len(lengths[w:]),
            "prompt_tokens": sum(prompt_tokens[w:]) / len(prompt_tokens[w:])}


def _child(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side in ("ours", "ours_unshared"):
            result = _side_ours(args, tmp, share_prompt_forward=args.side == "ours")
        else:
            result = _side_trl(args, tmp, gradient_checkpointing=args.side == "trl_gc")
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))
    return 0


SPREAD_KEYS = ("step_s", "step_cpu_s", "sampling_s", "rollout_other_s", "logps_forward_s", "backward_optimizer_s",
               "sampling_cpu_s", "rollout_other_cpu_s", "logps_forward_cpu_s", "backward_optimizer_cpu_s")


def _median_run(rows: list[dict]) -> dict:
    """The run with the median wall step time, with every run's values and their min-max."""
    ordered = sorted(rows, key=lambda r: r["step_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["runs"] = len(rows)
    for key in SPREAD_KEYS:
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"all_{key}"] = values
            out[f"{key}_range"] = [min(values), max(values)]
    return out


CHILD_ARGS = ("steps", "warmup", "prompts", "num_generations", "completion_length", "loss_type", "lr", "threads",
              "decoder", "lean_activations")


def _command(args) -> str:
    parts = ["metareason bench grpo"]
    if Path(args.config).resolve() != QUICKSTART.resolve():
        parts.append(f"--config {args.config}")
    parts += [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in CHILD_ARGS + ("repeats", "sides")]
    return " ".join(parts)


def _spread(r: dict, key: str, fmt: str = "{:.3f}") -> str:
    lo_hi = r.get(f"{key}_range")
    if not lo_hi or r.get("runs", 1) < 2:
        return fmt.format(r[key])
    return f"{fmt.format(r[key])} ({fmt.format(lo_hi[0])}-{fmt.format(lo_hi[1])})"


NAMES = (("ours", "metareason"), ("ours_unshared", "metareason, share_prompt_forward off"), ("trl", "TRL GRPOTrainer"),
         ("trl_gc", "TRL, gradient checkpointing (its default)"))
PARTS = (("sampling_s", "sampling"), ("rollout_other_s", "rest of rollout"), ("logps_forward_s", "log-prob forward"),
         ("backward_optimizer_s", "backward + optimizer"))


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
            for k in CHILD_ARGS:
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
    print(f"median of {args.repeats} run(s) per side, (min-max) over the runs; seconds per optimizer step")
    for side, name in NAMES:
        if side in results:
            r = results[side]
            print(f"{name}: step {_spread(r, 'step_s')} wall, {_spread(r, 'step_cpu_s')} CPU; peak "
                  f"{r['peak_mb']:.0f} MB; {r.get('prompt_tokens', float('nan')):.1f} tokens/prompt, "
                  f"{r['completion_tokens']:.1f} tokens/completion")
            for unit, tail in (("wall", "s"), ("CPU", "cpu_s")):
                print(f"    {unit:4s}: " + ", ".join(f"{label} {_spread(r, key[:-1] + tail)}" for key, label in PARTS))
    if not {"ours", "trl"} <= set(results):
        return 0
    speedup = results["trl"]["step_s"] / results["ours"]["step_s"]
    cpu_speedup = results["trl"]["step_cpu_s"] / results["ours"]["step_cpu_s"]
    mem_ratio = results["ours"]["peak_mb"] / results["trl"]["peak_mb"]
    print(f"speed-up (TRL step time / ours): {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU time; "
          f"peak memory ratio (ours / TRL): {mem_ratio:.2f}x")
    extra = {}
    if "ours_unshared" in results:  # the same loop without the shared prompt forward: TRL's arithmetic
        extra.update(ours_unshared=results["ours_unshared"],
                     speedup_unshared=results["trl"]["step_s"] / results["ours_unshared"]["step_s"],
                     cpu_time_speedup_unshared=results["trl"]["step_cpu_s"] / results["ours_unshared"]["step_cpu_s"])
        print(f"with rl.share_prompt_forward off: {extra['speedup_unshared']:.2f}x wall, "
              f"{extra['cpu_time_speedup_unshared']:.2f}x CPU time")
    if "trl_gc" in results:
        extra.update({"trl_gradient_checkpointing": results["trl_gc"],
                      "speedup_vs_trl_defaults": results["trl_gc"]["step_s"] / results["ours"]["step_s"],
                      "peak_memory_ratio_vs_trl_defaults": results["ours"]["peak_mb"] / results["trl_gc"]["peak_mb"]})
        print(f"against TRL with its default gradient checkpointing: {extra['speedup_vs_trl_defaults']:.2f}x, "
              f"peak memory {extra['peak_memory_ratio_vs_trl_defaults']:.2f}x")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_name()} ({os.cpu_count()} cores)"
    import transformers
    import trl

    record = {"benchmark": "grpo", "device": device, "torch": torch.__version__, "trl_version": trl.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": relative_path(args.config),
              "prompts_per_step": args.prompts, "num_generations": args.num_generations,
              "completion_length": args.completion_length, "loss_type": args.loss_type,
              "timed_steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats, "decoder": args.decoder,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "ours": results["ours"], "trl": results["trl"],
              "speedup": speedup, "cpu_time_speedup": cpu_speedup, "peak_memory_ratio": mem_ratio, **extra,
              "command": _command(args)}
    out = Path(args.out)
    write_record(out, record, _markdown(record))
    return 0


def _markdown(r: dict) -> str:
    rows = [("metareason (share_prompt_forward on)", r["ours"])]
    if "ours_unshared" in r:
        rows.append(("metareason, share_prompt_forward off", r["ours_unshared"]))
    rows.append(("TRL GRPOTrainer", r["trl"]))
    if "trl_gradient_checkpointing" in r:
        rows.append(("TRL, gradient checkpointing (its default)", r["trl_gradient_checkpointing"]))
    spread = " (min-max over the runs in brackets)" if r["repeats"] > 1 else ""
    lines = [f"# GRPO step: metareason vs TRL {r['trl_version']}", "",
             f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, {r['date']}.", "",
             f"Same model (of `{r['config']}`), {r['prompts_per_step']} causal-loop prompts x "
             f"{r['num_generations']} completions of exactly {r['completion_length']} tokens per optimizer step, "
             f"loss_type {r['loss_type']}, beta 0, num_iterations 1; {r['timed_steps']} timed steps after "
             f"{r['warmup_steps']} warm-up; each side in its own process; {r['repeats']} interleaved run(s) per "
             f"side, the median reported{spread}. Our sampling: the {r.get('decoder', 'lean')} decoder "
             f"(`generation.decoder`); our activations: {r['ours'].get('lean_activations') or 'not recorded'}. "
             f"Load average before/after: "
             f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f}; torch threads per side: "
             f"{r['ours'].get('threads')} (on a shared machine the CPU-time column is the steadier one, and more "
             f"threads than free cores make OpenMP spin: use `--threads 1` there).", "",
             "Prompt tokens per row as each side saw them (both sides get the run's prompt text, its chat "
             "template applied where the run uses one).", "",
             "| side | step (s, wall) | step (s, CPU) | peak RSS (MB) | prompt tokens | completion tokens |",
             "|---|---|---|---|---|---|"]
    for name, x in rows:
        lines.append(f"| {name} | {_spread(x, 'step_s')} | {_spread(x, 'step_cpu_s')} | {x['peak_mb']:.0f} | "
                     f"{x.get('prompt_tokens', float('nan')):.1f} | {x['completion_tokens']:.1f} |")
    lines += ["", f"Speed-up (TRL step time / ours): **{r['speedup']:.2f}x** wall, {r['cpu_time_speedup']:.2f}x "
              f"CPU time; peak memory ours / TRL: {r['peak_memory_ratio']:.2f}x."]
    if "speedup_unshared" in r:
        lines.append(f"With `rl.share_prompt_forward` off (each completion's forward recomputes its prompt, the "
                     f"arithmetic TRL does): **{r['speedup_unshared']:.2f}x** wall, "
                     f"{r['cpu_time_speedup_unshared']:.2f}x CPU time.")
    if "speedup_vs_trl_defaults" in r:
        lines.append(f"Against TRL with its default gradient checkpointing: {r['speedup_vs_trl_defaults']:.2f}x, "
                     f"peak memory {r['peak_memory_ratio_vs_trl_defaults']:.2f}x.")
    lines += ["", "Where a step goes (seconds per step; sampling: ours `generate_batch`, TRL `_generate`; rest of "
              "rollout: rewards, advantages; log-prob forward: the training forward with gradients; backward + "
              "optimizer: the rest of the step):",
              "", "| side | time | " + " | ".join(label for _, label in PARTS) + " |", "|---" * (len(PARTS) + 2) + "|"]
    for name, x in rows:
        for unit, tail in (("wall", "s"), ("CPU", "cpu_s")):
            keys = [key[:-1] + tail for key, _ in PARTS]
            if all(k in x for k in keys):
                lines.append(f"| {name} | {unit} | " + " | ".join(_spread(x, k) for k in keys) + " |")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)
