"""``metareason memory_reason compare | experiment`` (heavy modules load only when they run)."""
from __future__ import annotations


def _compare(args) -> int:
    from metareason.plugins.memory_reason.compare import run_compare

    run_compare(args.config_dir, out=args.out, overrides=list(args.overrides), quiet=args.quiet,
                output_dir=args.output_dir, stages=args.stages, seeds=args.seeds)
    return 0


def _experiment(args) -> int:
    from metareason.plugins.memory_reason.experiment import run_experiment

    run_experiment(args.config_dir, output_dir=args.output_dir, seeds=args.seeds,
                   arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else None,
                   stages=args.stages, out=args.out, overrides=list(args.overrides), quiet=args.quiet,
                   quick=args.quick, gates=not args.no_gates, n_val=args.n_val, n_heldout=args.n_heldout,
                   grid=tuple(float(x) for x in args.grid.split(",")) if args.grid else None)
    return 0


def _seeds(text: str) -> tuple:
    import argparse

    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("memory_reason", help="disentangled memory/reason steps: the comparison experiment")
    sub = p.add_subparsers(dest="memory_reason_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("compare", help="synthetic world: plain CoT SFT vs memory/reason tokens (full, "
                                       "lora+prompt-tuning) from one base -> bench-results/memory_reason-*.md/json")
    s.add_argument("config_dir", nargs="?", default="configs/memory_reason",
                   help="folder with world_base.yaml, world_plain.yaml, world_tokens_full.yaml, world_tokens_lora_pt.yaml")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant (not the base)")
    s.add_argument("--out", default="bench-results/memory_reason-world", help="report path without suffix")
    s.add_argument("--output-dir", default="runs", help="where the runs go (default runs)")
    s.add_argument("--stages", default="base,variants,report", help="comma list of base,variants,report")
    s.add_argument("--seeds", type=_seeds, default=(0,), help="comma list of training seeds per variant (default 0)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_compare)

    e = sub.add_parser("experiment", help="issue 29 on the varied world: a base per seed (gated), lr chosen on "
                                          "validation, 5 arms on held-out, paired tests -> bench-results/*.md/json")
    e.add_argument("config_dir", nargs="?", default="configs/memory_reason/varied",
                   help="folder with base.yaml, base_arith.yaml and one YAML per arm; an experiment.yaml there "
                        "changes the design's settings (configs/memory_reason/smollm2: the real model)")
    e.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    e.add_argument("--output-dir", default="runs/memory_reason_i29", help="runs and experiment.json (resumable)")
    e.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma list; the first one's base holds the lr grid")
    e.add_argument("--arms", default="", help="comma list of arms (default: experiment.yaml's, else "
                                              "plain,tokens_full,filler,plain_lora,tokens_lora_pt)")
    e.add_argument("--stages", default="base,grid,heldout,report", help="comma list of base,grid,heldout,report")
    e.add_argument("--out", default="bench-results/memory_reason-varied", help="report path without suffix")
    e.add_argument("--grid", default="", help="comma list of lrs for every arm (default: the design's grid per arm)")
    e.add_argument("--n-val", type=int, default=None, help="validation questions (default: experiment.yaml's, else 300)")
    e.add_argument("--n-heldout", type=int, default=None,
                   help="held-out questions (default: experiment.yaml's, else 700)")
    e.add_argument("--no-gates", action="store_true", help="record the base gates without stopping on a failure")
    e.add_argument("--quick", action="store_true", help="2 steps per run, 8 new tokens: a smoke test of the pipeline")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_experiment)
