"""``metareason cspo takeover | infer | demo`` (heavy modules load only when a command runs)."""
from __future__ import annotations

import json


def _takeover(args) -> int:
    from metareason.plugins.cspo.takeover import run_takeover

    summary = run_takeover(args.config, list(args.overrides), quiet=args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _infer(args) -> int:
    from metareason.plugins.cspo.takeover import run_infer

    summary = run_infer(args.config, list(args.overrides), quiet=args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _demo(args) -> int:
    from metareason.plugins.cspo.demo import run_demo

    run_demo(args.config_dir, stages=args.stages, out=args.out, quiet=args.quiet, overrides=list(args.overrides))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("cspo", help="MERA control: takeover data, alternating inference, the CSPO demo")
    sub = p.add_subparsers(dest="cspo_command", metavar="SUBCOMMAND", required=True)
    for name, fn, help_text in (
        ("takeover", _takeover, "build SFT data with control segments: the alter takes over the target at "
                                "validation keywords (data.train prompts -> JSONL)"),
        ("infer", _infer, "alternating control inference on data.eval (target and alter in Ray actors)"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("config", help="YAML run config with a cspo section")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cspo.max_target_tokens=32")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        s.set_defaults(func=fn)
    s = sub.add_parser("demo", help="the causal-loop demonstration: SFT, takeover, SFT with control, CSPO, "
                                    "evaluation -> bench-results/cspo-demo.md")
    s.add_argument("config_dir", nargs="?", default="configs/cspo", help="folder of causal_loop_*.yaml")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every stage")
    s.add_argument("--stages", default="all", help="comma list of sft,takeover,control,cspo,report (default all)")
    s.add_argument("--out", default="bench-results/cspo-demo", help="report path without suffix (.md and .json)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_demo)
