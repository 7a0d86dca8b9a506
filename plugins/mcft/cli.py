"""``metareason mcft critiques | eval | compare`` (heavy modules load only when a command runs)."""
from __future__ import annotations

import json


def _critiques(args) -> int:
    from metareason.api import Kernel
    from metareason.plugins.mcft.critiques import build_critiques

    kernel = Kernel(args.config, overrides=list(args.overrides))
    summary = build_critiques(kernel, split=args.split, out=args.out, quiet=args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args) -> int:
    from metareason.plugins.mcft.evaluation import evaluate_run

    metrics = evaluate_run(args.run_dir, list(args.overrides), args.checkpoint, args.entropy_threshold)
    print(json.dumps(metrics, indent=2))
    return 0


def _compare(args) -> int:
    from metareason.plugins.mcft.compare import run_compare

    run_compare(args.config, list(args.overrides), out=args.out, arms=args.arms, quiet=args.quiet, reuse=args.reuse)
    return 0


def _experiment(args) -> int:
    from metareason.plugins.mcft.experiment import run_experiment

    run_experiment(args.config, list(args.overrides), out=args.out, quick=args.quick, quiet=args.quiet,
                   reuse=args.reuse, arms=args.arms)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("mcft", help="masked critique fine-tuning: critique data, evaluation, the comparison")
    sub = p.add_subparsers(dest="mcft_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("critiques", help="build critique data: base-generator attempts on data.<split> questions, "
                                         "critiqued by the teacher generator -> JSONL")
    s.add_argument("config", help="YAML run config with mcft.base_generator, mcft.teacher_generator, generators:")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mcft.attempts=2")
    s.add_argument("--split", choices=("train", "eval"), default="train", help="questions from data.train or data.eval")
    s.add_argument("--out", default=None, help="output JSONL (default: mcft.output or runs/<name>/critiques-<split>.jsonl)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_critiques)

    s = sub.add_parser("eval", help="accuracy, format adherence and entropy failure flags of a trained run")
    s.add_argument("run_dir", help="run directory")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mcft.entropy_threshold=0.5")
    s.add_argument("--checkpoint", default=None, help="checkpoint directory name (default: the latest)")
    s.add_argument("--entropy-threshold", type=float, default=None, help="override mcft.entropy_threshold")
    s.set_defaults(func=_eval)

    s = sub.add_parser("compare", help="MCFT vs critique SFT vs answer SFT and a threshold sweep on the same data "
                                       "-> bench-results/mcft-compare.md/json")
    s.add_argument("config", nargs="?", default="configs/mcft/compare.yaml", help="base config of every arm")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm")
    s.add_argument("--arms", default="all", help="comma list of arm names (default all)")
    s.add_argument("--out", default="bench-results/mcft-compare", help="report path without suffix (.md and .json)")
    s.add_argument("--reuse", action="store_true", help="skip training an arm whose run directory holds its final checkpoint "
                                                         "and the same model/data/train/mcft config")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_compare)

    s = sub.add_parser("experiment", help="issue 30: a base that solves the task, a small critique set, threshold / "
                                          "bf_beta / solution-SFT / answer-SFT arms, lr chosen on validation, "
                                          "several seeds, McNemar -> bench-results/mcft-experiment.md/json")
    s.add_argument("config", nargs="?", default="configs/mcft/experiment.yaml",
                   help="base config of every run, with an experiment: section (seeds, lrs, steps, sizes)")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    s.add_argument("--arms", default=None, help="comma list of arm names (default all: t0,t0.1,t0.2,t0.3,bf0,"
                                                "solution_sft,answer_sft)")
    s.add_argument("--out", default="bench-results/mcft-experiment", help="report path without suffix (.md and .json)")
    s.add_argument("--quick", action="store_true", help="every stage at a miniature size (a smoke test, not a measurement)")
    s.add_argument("--reuse", action="store_true", help="skip training a run whose directory holds its final checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_experiment)
