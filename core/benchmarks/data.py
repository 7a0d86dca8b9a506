"""``metareason bench data``: causal-loop generation speed on this machine.

Measured (best of ``--repeats`` runs after one warm-up, wall clock):

* ``in_memory``: ``make_task(...)`` plus building every example dict (prompt, step-by-step
  completion, answer, group, level, rounds) in one process: what a training run pays;
* ``columns``: the same without the dicts (texts and answers as columns);
* ``per_level``: ``in_memory`` for each level alone;
* ``parallel``: ``--workers`` processes, each generating full example dicts for its own index
  range (examples depend only on seed and index, so the shards are the same examples);
  samples/s over the wall time of all shards, the pool started beforehand;
* ``jsonl_write``: ``metareason data generate`` without the progress bar (generation + JSON
  lines + atomic write to a temporary directory), samples/s and MB/s.

The seed (ZeroModel) claims about 150K samples/s for its generator; each row is printed
against that figure and all of it goes to ``--out`` (default ``bench-results/data-cpu.json``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import Callable

from metareason.benchmarks import DEFAULT_OUT, cpu_name
from metareason.durable import write_json_atomic

SEED_CLAIM = 150_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, default=200_000, help="examples per run (default 200000)")
    parser.add_argument("--levels", default="1,2,3,4", help="levels, mixed round-robin (default 1,2,3,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is kept")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes for the parallel row (default: min(2, cores))")
    parser.add_argument("--out", default=os.path.join(DEFAULT_OUT, "data-cpu.json"),
                        help=f"result file (default {DEFAULT_OUT}/data-cpu.json)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (imports, numpy caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _shard(job: tuple) -> int:
    """Worker: full example dicts for ``start..stop-1``; returns how many (dicts stay here)."""
    from metareason.data.causal_loop import generate_columns, iter_examples

    cfg, seed, start, stop = job
    examples = list(iter_examples(generate_columns(cfg, seed, start, stop), seed, start))
    return len(examples)




def run(args) -> int:
    import numpy as np

    from metareason.data.causal_loop import generate_columns, make_task, parse_params
    from metareason.data.export import write_causal_loop

    n, seed = args.num_samples, 0
    if n <= 0 or args.repeats <= 0 or args.workers <= 0:
        print("error: --num-samples, --repeats and --workers must be > 0", file=sys.stderr)
        return 2
    cfg = parse_params({"levels": args.levels})
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    rows: dict[str, dict] = {}

    def record(name: str, seconds: float, count: int, **extra) -> None:
        rate = count / seconds
        rows[name] = {"samples": count, "seconds": round(seconds, 4), "samples_per_s": round(rate),
                      "vs_seed_claim": round(rate / SEED_CLAIM, 2), **extra}
        say(f"  {name:24s} {rate:>12,.0f} samples/s  ({rate / SEED_CLAIM:.2f}x the seed's 150K)")

    say(f"causal_loop levels {','.join(map(str, cfg.levels))}, {n} samples, best of {args.repeats}")
    record("in_memory", _best(lambda: list(make_task({"levels": list(cfg.levels)}, seed, n)), args.repeats), n)
    record("columns", _best(lambda: generate_columns(cfg, seed, 0, n), args.repeats), n)
    for level in cfg.levels:
        m = max(1, n // len(cfg.levels))
        record(f"level_{level}", _best(lambda lv=level: list(make_task({"levels": [lv]}, seed, m)), args.repeats), m)

    if args.workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        bounds = np.linspace(0, n, args.workers + 1).astype(int).tolist()
        jobs = [(cfg, seed, bounds[i], bounds[i + 1]) for i in range(args.workers)]
        with ctx.Pool(args.workers) as pool:
            pool.map(_shard, jobs)  # start and warm the workers
            seconds = _best(lambda: pool.map(_shard, jobs), args.repeats)
        record(f"parallel_{args.workers}proc", seconds, n, workers=args.workers)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "causal_loop.jsonl")
        seconds = _best(lambda: write_causal_loop(cfg, seed, n, path, "jsonl"), args.repeats)
        size = os.path.getsize(path)
    record("jsonl_write", seconds, n, bytes=size, mb_per_s=round(size / seconds / 1e6, 1))

    lengths = make_task({"levels": list(cfg.levels)}, seed, min(n, 20_000)).columns
    chars = {
        "prompt_mean": round(float(np.mean([len(p) for p in lengths["prompt"]])), 1),
        "completion_mean": round(float(np.mean([len(c) for c in lengths["completion"]])), 1),
        "completion_max": int(max(len(c) for c in lengths["completion"])),
    }
    result = {
        "benchmark": "data",
        "task": "causal_loop",
        "levels": list(cfg.levels),
        "num_samples": n,
        "repeats": args.repeats,
        "seed_claim_samples_per_s": SEED_CLAIM,
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(),
                   "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "chars": chars,
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, result)
    best = rows["in_memory"]["samples_per_s"]
    verdict = "beats" if best > SEED_CLAIM else "does NOT beat"
    print(f"causal_loop in-memory generation: {best:,} samples/s on {os.cpu_count()} cores (1 process), "
          f"{verdict} the seed's claimed {SEED_CLAIM:,}; JSONL write {rows['jsonl_write']['samples_per_s']:,} "
          f"samples/s; written to {args.out}")
    return 0
