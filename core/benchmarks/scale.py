"""``metareason bench scale``: GRPO rollout throughput (completions/s) with 1, 2, ... Ray rollout
actors, beside the single-process loop, in the same run.

The policy is the quickstart architecture (random init). One measured *step* is one rollout of
``--prompts`` prompts x ``--generations`` completions through ``generate_rollout`` (sampling,
rewards, advantages), exactly as the GRPO loop calls it: in this process (the kernel's batched
sampler), or through :class:`metareason.scale.rollout.RolloutPool` with a new weight version
every step (so each step includes the ``ray.put`` of the weights and every actor's fetch). Every
process (driver and actors) gets ``--threads`` torch threads, so each actor has the same compute
budget as the single process. The settings are measured in rounds (one step of each per round,
medians over the rounds), so that load from other work on the machine hits them alike. A second single-process row runs the actors' sampler in this
process (each prompt's group is one ``generate`` call under its own seed, so that a shard's
completions do not depend on the sharding): the gap between it and the kernel's batched loop is
the cost of that per-group batching; the gap between it and one actor is the Ray overhead
(weight push and fetch, transfer of the completions, scheduling).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from metareason.benchmarks import DEFAULT_OUT, cpu_name, write_record
from metareason.configs import QUICKSTART



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actors", default="1,2", help="comma list of rollout actor counts")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (train.batch_size)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (rl.num_generations)")
    parser.add_argument("--max-tokens", type=int, default=32, help="rl.max_completion_length")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per setting (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--config", default=str(QUICKSTART), help="run config of the policy (default: quickstart, random init)")
    parser.add_argument("--device", default="cpu", help="model.device of the learner and the actors (cpu, cuda)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per rollout actor (scale.use_gpu)")
    parser.add_argument("--out", default=f"{DEFAULT_OUT}/scale-rollout-cpu.json", help="JSON record (and .md beside it)")


def _kernel(args):
    from metareason.kernel import Kernel

    return Kernel(args.config, overrides=[
        "quiet=true", "plugins=[]", f"model.device={args.device}", f"scale.use_gpu={str(args.gpu).lower()}",
        "train.algorithm=grpo", f"train.batch_size={args.prompts}",
        f"rl.num_generations={args.generations}", f"rl.max_completion_length={args.max_tokens}",
        "rl.rewards={causal_loop_exact: 1.0}", "rl.generation_kwargs={min_new_tokens: %d}" % args.max_tokens,
        f"scale.resources_per_worker={{CPU: {args.threads}}}", "scale.get_timeout_s=900"])


def _time_steps(fn, steps: int) -> list[float]:
    fn(-1)  # warm-up: actor start-up is not in the numbers
    out = []
    for v in range(steps):
        t0 = time.perf_counter()
        fn(v)
        out.append(time.perf_counter() - t0)
    return out


def run(args: argparse.Namespace) -> int:
    import ray
    import torch

    from metareason.scale.rollout import LocalSampler, RolloutPool, trainable_state
    from metareason.scale.runtime import connect
    from metareason.train.grpo import generate_rollout
    from metareason.train.loop import seed_everything

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    actors = [int(a) for a in args.actors.split(",")]
    kernel = _kernel(args)
    seed_everything(0)
    model, tokenizer = kernel.load()
    from metareason.data.causal_loop import make_task

    task = make_task({"levels": [1, 2], "split": "train"}, 0, args.prompts)
    examples = [dict(task[i]) for i in range(args.prompts)]
    per_step = args.prompts * args.generations
    rows = []

    local = LocalSampler(kernel)
    settings = [("single process (kernel loop)", 0, None),
                ("single process, per-group seeded sampler (the actors' code)", 0, local)]
    connect("local", num_cpus=sum(actors) * args.threads)
    pools = []
    try:
        state = trainable_state(model)
        push_bytes = sum(t.numel() * t.element_size() for t in state.values())
        t0 = time.perf_counter()
        for _ in range(5):
            ray.put(state)
        push_s = (time.perf_counter() - t0) / 5
        for n in actors:
            pools.append(RolloutPool(kernel, num_workers=n))
            settings.append(("Ray rollout actors", n, pools[-1]))
        times: list[list[float]] = [[] for _ in settings]
        # rounds over the settings (one step each), so that a change in the machine's load hits
        # every setting alike; round 0 is the warm-up (actor start-up, first fetch)
        for rnd in range(args.steps + 1):
            for i, (_, _, sampler) in enumerate(settings):
                t0 = time.perf_counter()
                generate_rollout(kernel, model, tokenizer, examples, sampler=sampler, version=rnd)
                if rnd:
                    times[i].append(time.perf_counter() - t0)
            print(f"[bench scale] round {rnd}/{args.steps}", file=sys.stderr, flush=True)
    finally:
        for pool in pools:
            pool.close()
        ray.shutdown()
    for (mode, n, _), ts in zip(settings, times):
        rows.append({"mode": mode, "actors": n, "step_s": statistics.median(ts), "steps_s": ts})
    for r in rows:
        r["completions_per_s"] = per_step / r["step_s"]
        r["per_actor_completions_per_s"] = r["completions_per_s"] / r["actors"] if r["actors"] else None
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        "benchmark": "scale-rollout",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(), "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": load_start,
        "threads_per_process": args.threads, "parameters": n_params,
        "model": Path(args.config).name + (" (random init)" if not kernel.config.model.path else ""),
        "prompts": args.prompts, "generations": args.generations, "completion_tokens": args.max_tokens,
        "completions_per_step": per_step, "weights_bytes": push_bytes, "ray_put_s": push_s, "rows": rows,
        "command": " ".join(["metareason bench scale"] + (sys.argv[3:] if sys.argv[1:3] == ["bench", "scale"] else [])),
    }
    record["load_average_1m_at_end"] = os.getloadavg()[0]
    write_record(args.out, record, _markdown(record))
    return 0


def _markdown(r: dict) -> str:
    single = r["rows"][0]
    lines = [f"# GRPO rollout throughput: Ray rollout actors vs the single-process loop", "",
             f"Command: `{r['command']}`", "",
             f"{r['device']}, {r['cpu_count']} CPUs, shared with other work while measured (1-minute load average "
             f"{r['load_average_1m_at_start']:.1f} at the start, {r['load_average_1m_at_end']:.1f} at the end), "
             f"{r['threads_per_process']} torch thread(s) per process; {r['model']}, {r['parameters']:,} parameters; "
             f"{r['prompts']} prompts x {r['generations']} completions x {r['completion_tokens']} tokens per step "
             f"(min_new_tokens = max, so every completion has the same length).", "",
             "| sampler | actors | s / step (median) | completions / s | per actor | vs single process |",
             "|---|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        per = f"{x['per_actor_completions_per_s']:.1f}" if x["per_actor_completions_per_s"] else "—"
        lines.append(f"| {x['mode']} | {x['actors']} | {x['step_s']:.2f} | {x['completions_per_s']:.1f} | {per} | "
                     f"{single['step_s'] / x['step_s']:.2f}x |")
    lines += ["", f"Weights pushed per step: {r['weights_bytes'] / 2**20:.1f} MiB, one `ray.put` "
                  f"{r['ray_put_s'] * 1000:.1f} ms.", ""]
    return "\n".join(lines) + "\n"
