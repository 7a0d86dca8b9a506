"""``metareason lru sweep CONFIG_DIR``, ``metareason lru stats RUN_DIR`` and
``metareason lru bench-decode CONFIG_DIR``."""
from __future__ import annotations

import shlex
import sys

from metareason.api import UserError


QUICK = {"steps": 4, "lrs": "2e-3,4e-3", "seeds": "2", "val_samples": 8, "test_samples": 8, "extend": 0}
QUICK_OVERRIDES = ["generation.max_new_tokens=24", "train.log_every=1", "train.warmup_steps=0"]


def cmd_sweep(args) -> int:
    import os

    from metareason.plugins.lru.sweep import Plan, parse_floats, parse_seeds, run_sweep

    if args.quick:  # the machinery end to end in a few minutes: nothing in it measures anything
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    for name in ("steps", "val_samples", "test_samples", "jobs"):
        value = getattr(args, name)
        if value is not None and int(value) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value}")
    if args.extend is not None and args.extend < 0:
        raise UserError(f"--extend: expected an int >= 0, got {args.extend}")
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    jobs = args.jobs or max(1, min(2, os.cpu_count() or 1))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    plan = Plan(lrs=parse_floats(args.lrs or "1e-3,2e-3,4e-3", "--lrs"), seeds=parse_seeds(args.seeds or "2"),
                val_samples=args.val_samples or 200, test_samples=args.test_samples or 400, jobs=jobs, threads=threads,
                results_dir=args.results_dir, extend=2 if args.extend is None else args.extend,
                keep_weights=args.keep_weights)
    if args.keep_weights and not args.results_dir:
        raise UserError("--keep-weights: needs --results-dir (the weights are kept there)")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else None
    command = "metareason " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "metareason lru sweep"
    path, results, test_errors = run_sweep(args.config_dir, args.out, args.runs_dir, args.prefix, overrides, plan,
                                           use_ray=args.ray, command=command, groups=groups, quick=args.quick)
    print(f"report: {path}")
    failed = sorted({r.trial.group for r in results if not r.ok}) + sorted(test_errors)
    if failed:
        print(f"error: trials failed: {', '.join(failed)} (see the report)", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args) -> int:
    from metareason.plugins.lru.level_stats import run_dir_stats

    print(f"lru stats: {run_dir_stats(args.run_dir, args.checkpoint)}")
    return 0


def cmd_bench_decode(args) -> int:
    import datetime as _dt
    import json
    import os
    from pathlib import Path

    import torch

    from metareason.api import cpu_name
    from metareason.plugins.lru.bench_decode import print_decode, run_decode

    for name in ("repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name}: expected an int >= 1, got {value}")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    kw = dict(settings=((2, 96, 8),), repeats=1) if args.quick else {}
    if args.repeats:
        kw["repeats"] = args.repeats
    result = run_decode(args.config_dir, threads=args.threads, **kw)
    print_decode(result)
    result.update(device=cpu_name(), torch=torch.__version__,
                  loadavg_1m_before=None if load_before is None else round(load_before[0], 2),
                  loadavg_1m_after=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  command="metareason " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                  if sys.argv[1:3] == ["lru", "bench-decode"] else "metareason lru bench-decode")
    path = Path(args.out) / f"kernels-decode-cpu{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file
    print(f"\nwrote {path}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("lru", help="ZeroModel (MLA + LRU): experiment sweep, per-level LRU statistics, "
                                          "decode benchmark")
    sub = p.add_subparsers(dest="lru_command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser("sweep", help="the group comparison: lr grid on validation, seeds, test report",
                       description="Train every group config of CONFIG_DIR (*.yaml) under one protocol: the same "
                                   "token budget, a learning-rate grid per group chosen on the validation split "
                                   "(first seed), the other seeds at the chosen rate, then the test split; writes "
                                   "OUT/PREFIX.md, .json and PNG plots. Finished trials are reused (resume).")
    s.add_argument("config_dir", help="directory of run configs, e.g. configs/lru/")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every config")
    s.add_argument("--out", default="bench-results", help="report directory (default: bench-results)")
    s.add_argument("--prefix", default="lru-sweep", help="report file prefix (default: lru-sweep)")
    s.add_argument("--runs-dir", default="runs/lru-sweep", help="where the run directories go")
    s.add_argument("--steps", type=int, help="train.max_steps for every group (default: the configs')")
    s.add_argument("--lrs", help="learning-rate grid, comma-separated (default: 1e-3,2e-3,4e-3)")
    s.add_argument("--seeds", help="number of seeds (default 2) or a comma-separated list; the grid runs on the first")
    s.add_argument("--val-samples", type=int, help="validation problems per run (default 200)")
    s.add_argument("--test-samples", type=int, help="test problems per run (default 400)")
    s.add_argument("--extend", type=int,
                   help="times a group's grid may grow one step past the edge its best rate sits on (default 2; "
                        "0: the grid as given)")
    s.add_argument("--groups", help="only these groups, e.g. A,E (default: every config)")
    s.add_argument("--results-dir", help="also keep each finished trial's results (no checkpoints) here and reuse "
                                         "them, e.g. to finish a sweep in pieces on fresh machines")
    s.add_argument("--keep-weights", action="store_true",
                   help="with --results-dir, also keep a trial's final model weights there until its test evaluation "
                        "is done (then they are dropped), so a sweep can be finished on a fresh machine")
    s.add_argument("--jobs", type=int, help="trials at a time (default: min(2, CPUs))")
    s.add_argument("--threads", type=int, help="torch threads per trial (default: CPUs // jobs)")
    s.add_argument("--quick", action="store_true",
                   help="a check of the machinery: 4 steps, 2 rates, 2 seeds, 8 eval problems (measures nothing)")
    launch = s.add_mutually_exclusive_group()
    launch.add_argument("--ray", dest="ray", action="store_true", default=None, help="run groups as Ray tasks")
    launch.add_argument("--no-ray", dest="ray", action="store_false", help="run groups as plain subprocesses")
    s.set_defaults(func=cmd_sweep)

    t = sub.add_parser("stats", help="per-level LRU statistics of a run (teacher-forced over its eval data)")
    t.add_argument("run_dir", help="a run directory (runs/NAME)")
    t.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    t.set_defaults(func=cmd_stats)

    b = sub.add_parser("bench-decode", help="greedy decode speed and cache bytes of the group archs (CPU)",
                       description="Greedy decoding of the LRU experiment's A (Llama) and B (MLA) archs, random "
                                   "weights: Llama's K/V cache, MLA's latent cache with the absorbed decode form and "
                                   "with it switched off (decompressed), and the paged cache through "
                                   "metareason.ops.mla_decode. Writes OUT/kernels-decode-cpu.json.")
    b.add_argument("config_dir", help="directory holding a_llama.yaml and b_mla.yaml, e.g. configs/lru/")
    b.add_argument("--out", default="bench-results", help="folder for kernels-decode-cpu.json (default: bench-results; this repository's record: --out bench/results)")
    b.add_argument("--quick", action="store_true", help="one small setting, one repeat (a smoke run)")
    b.add_argument("--repeats", type=int, help="timed rounds per model, best kept (default 2)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    b.set_defaults(func=cmd_bench_decode)
