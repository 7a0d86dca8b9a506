"""``metareason lru sweep CONFIG_DIR`` and ``metareason lru stats RUN_DIR``."""
from __future__ import annotations

import shlex
import sys

from metareason.errors import UserError


def cmd_sweep(args) -> int:
    from metareason.plugins.lru.sweep import run_sweep

    overrides = list(args.overrides)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps: expected an int >= 1, got {args.steps}")
        overrides.append(f"train.max_steps={args.steps}")
    if args.eval_samples is not None:
        if args.eval_samples < 1:
            raise UserError(f"--eval-samples: expected an int >= 1, got {args.eval_samples}")
        overrides.append(f"eval.max_samples={args.eval_samples}")
    command = "metareason " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "metareason lru sweep"
    path, results = run_sweep(args.config_dir, args.out, args.runs_dir, args.prefix, overrides,
                              use_ray=args.ray, command=command)
    print(f"report: {path}")
    failed = [r.spec.group for r in results if not r.ok]
    if failed:
        print(f"error: groups failed: {', '.join(failed)} (see the report)", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args) -> int:
    from metareason.plugins.lru.level_stats import run_dir_stats

    print(f"lru stats: {run_dir_stats(args.run_dir, args.checkpoint)}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("lru", help="ZeroModel (MLA + LRU): experiment sweep, per-level LRU statistics")
    sub = p.add_subparsers(dest="lru_command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser("sweep", help="train every group config of a directory (A-D), then one report",
                       description="Run each *.yaml of CONFIG_DIR in its own process (Ray tasks when Ray "
                                   "is installed), then write OUT/PREFIX.md, .json and PNG plots.")
    s.add_argument("config_dir", help="directory of run configs, e.g. configs/lru/")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every config")
    s.add_argument("--out", default="bench/results", help="report directory (default: bench/results)")
    s.add_argument("--prefix", default="lru-sweep", help="report file prefix (default: lru-sweep)")
    s.add_argument("--runs-dir", default="runs/lru-sweep", help="where the run directories go")
    s.add_argument("--steps", type=int, help="train.max_steps for every group (a quick run)")
    s.add_argument("--eval-samples", type=int, help="eval.max_samples for every group")
    launch = s.add_mutually_exclusive_group()
    launch.add_argument("--ray", dest="ray", action="store_true", default=None, help="run groups as Ray tasks")
    launch.add_argument("--no-ray", dest="ray", action="store_false", help="run groups as plain subprocesses")
    s.set_defaults(func=cmd_sweep)

    t = sub.add_parser("stats", help="per-level LRU statistics of a run (teacher-forced over its eval data)")
    t.add_argument("run_dir", help="a run directory (runs/NAME)")
    t.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    t.set_defaults(func=cmd_stats)
