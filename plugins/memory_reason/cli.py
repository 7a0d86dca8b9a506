"""``metareason memory_reason compare`` (heavy modules load only when it runs)."""
from __future__ import annotations


def _compare(args) -> int:
    from metareason.plugins.memory_reason.compare import run_compare

    run_compare(args.config_dir, out=args.out, overrides=list(args.overrides), quiet=args.quiet,
                output_dir=args.output_dir, stages=args.stages, seeds=args.seeds)
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
                                       "lora+prompt-tuning) from one base -> bench/results/memory_reason-*.md/json")
    s.add_argument("config_dir", nargs="?", default="configs/memory_reason",
                   help="folder with world_base.yaml, world_plain.yaml, world_tokens_full.yaml, world_tokens_lora_pt.yaml")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant (not the base)")
    s.add_argument("--out", default="bench/results/memory_reason-world", help="report path without suffix")
    s.add_argument("--output-dir", default="runs", help="where the runs go (default runs)")
    s.add_argument("--stages", default="base,variants,report", help="comma list of base,variants,report")
    s.add_argument("--seeds", type=_seeds, default=(0,), help="comma list of training seeds per variant (default 0)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_compare)
