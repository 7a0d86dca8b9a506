"""``metareason sweep CONFIG --grid KEY=V1,V2 ...``: a config grid as Ray Tune trials, one report.

Every combination of the ``--grid`` values is one trial: the run config with those overrides
(plus the common ones), run by the kernel (``Kernel.run``) inside a Tune trial with its own
resources (``--cpus-per-trial``/``--gpus-per-trial``; default from the config's ``scale:``).
Every trial config is validated before anything starts (a bad value is a one-line error
naming the trial). A trial that fails while running is reported with its error and the others
complete. ``--resume`` continues an interrupted sweep (finished trials are kept). The report
(``OUT/PREFIX.md``, ``.json``, ``-loss.png``, ``-final.png``) holds a table of every trial.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from metareason.durable import write_bytes_atomic, write_json_atomic, write_text_atomic
from metareason.errors import UserError


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2 (e.g. train.lr=1e-3,3e-3)")
        key, values = item.split("=", 1)
        vals = [v for v in values.split(",")]
        if not key or not values or any(v == "" for v in vals):
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2 with non-empty values")
        if key in [k for k, _ in grid]:
            raise UserError(f"--grid {key}: given twice")
        grid.append((key, vals))
    if not grid:
        raise UserError("--grid: at least one KEY=V1,V2 is needed")
    return grid


def trial_overrides(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(v for _, v in grid))]


def build_trials(config: str, grid, overrides: list[str], runs_dir: str, name: str) -> list[dict]:
    """One payload per trial: the raw config (validated here) and its identity."""
    from metareason.config import ConfigError, apply_overrides, load_config, read_yaml
    from metareason.scale.train import absolute_paths

    base = read_yaml(config)
    trials = []
    for i, combo in enumerate(trial_overrides(grid)):
        run_name = f"{name}-t{i:02d}"
        raw = apply_overrides(base, [*overrides, *combo, f"name={run_name}", f"output_dir={runs_dir}", "quiet=true"],
                              source=config)
        try:
            load_config(data=raw, source=f"{config} (trial {i}: {' '.join(combo)})")
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        trials.append({"index": i, "overrides": combo, "run_name": run_name,
                       "raw": absolute_paths(raw, os.getcwd())})
    return trials


def run_trial(payload: dict) -> dict:
    """In the Tune trial: train and evaluate with the kernel; the numbers the report needs."""
    import torch

    from metareason.kernel import Kernel
    from metareason.metrics import read_metrics

    threads = int(os.environ.get("METAREASON_TRIAL_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    kernel = Kernel(payload["raw"])
    final = kernel.run(overwrite=True)  # a trial Tune runs again starts its run directory again
    rows = read_metrics(kernel.config.run_dir)
    curve = [[r["step"], r["train/loss"]] for r in rows if "train/loss" in r]
    out: dict[str, Any] = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
    out["loss_curve"] = curve
    out["final_train_loss"] = curve[-1][1] if curve else None
    return out


# ------------------------------------------------------------------------------------ report
def _plot(rows: list[dict], out_dir: Path, prefix: str) -> dict[str, str]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    ok = [r for r in rows if r["ok"] and r["loss_curve"]]
    if ok:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in ok:
            steps, losses = zip(*r["loss_curve"])
            ax.plot(steps, losses, label=r["label"])
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=100)
        plt.close(fig)
        write_bytes_atomic(out_dir / f"{prefix}-loss.png", buf.getvalue())
        plots["loss"] = f"{prefix}-loss.png"
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["label"] for r in ok], [r["final_train_loss"] for r in ok])
        ax.set_ylabel("final train loss")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=100)
        plt.close(fig)
        write_bytes_atomic(out_dir / f"{prefix}-final.png", buf.getvalue())
        plots["final"] = f"{prefix}-final.png"
    return plots


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_report(trials: list[dict], outcomes, out_dir: Path, prefix: str, command: str, grid) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for t, o in zip(trials, outcomes):
        rows.append({"trial": t["index"], "run_name": t["run_name"], "overrides": t["overrides"],
                     "label": " ".join(t["overrides"]), "ok": o.ok, "error": o.error,
                     "final_train_loss": o.metrics.get("final_train_loss"),
                     "eval_accuracy": o.metrics.get("eval/accuracy"),
                     "wall_s": o.metrics.get("trial_wall_s"), "loss_curve": o.metrics.get("loss_curve") or []})
    plots = _plot(rows, out_dir, prefix)
    data = {"command": command, "grid": {k: v for k, v in grid}, "trials": rows,
            "failed": [r["trial"] for r in rows if not r["ok"]]}
    write_json_atomic(out_dir / f"{prefix}.json", data)
    keys = [k for k, _ in grid]
    lines = [f"# Sweep: {len(rows)} trials, {len(data['failed'])} failed", "", f"Command: `{command}`", "",
             "| trial | " + " | ".join(keys) + " | status | final train loss | eval accuracy | wall s |",
             "|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for r in rows:
        vals = [o.split("=", 1)[1] for o in r["overrides"]]
        status = "ok" if r["ok"] else "FAILED"
        lines.append(f"| {r['run_name']} | " + " | ".join(vals) + f" | {status} | {_fmt(r['final_train_loss'])} | "
                     f"{_fmt(r['eval_accuracy'])} | {_fmt(r['wall_s'] and round(r['wall_s'], 1))} |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {r['run_name']} ({r['label']}): {r['error']}" for r in failed]
    for name, file in plots.items():
        lines += ["", f"![{name}]({file})"]
    path = out_dir / f"{prefix}.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run config every trial starts from")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every trial")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeat: every combination is a trial)")
    p.add_argument("--ray", default="local", metavar="ADDRESS|local",
                   help="Ray cluster address (HOST:PORT, auto) or 'local' (default: a new local runtime)")
    p.add_argument("--out", default="runs/sweep", help="report directory (default: runs/sweep)")
    p.add_argument("--name", default="sweep", help="sweep name: report prefix and run-name prefix")
    p.add_argument("--runs-dir", help="where the trials' run directories go (default: OUT/runs)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: scale.resources_per_worker CPU, 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (default: 1 with scale.use_gpu, else 0)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")


def run(args) -> int:
    from metareason.config import load_config
    from metareason.scale.runtime import connect
    from metareason.scale.tune import run_trials

    for flag, value in (("--cpus-per-trial", args.cpus_per_trial), ("--gpus-per-trial", args.gpus_per_trial)):
        if value is not None and value < 0:
            raise UserError(f"{flag}: expected a number >= 0, got {value:g}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent: expected an int >= 1, got {args.max_concurrent}")
    grid = parse_grid(args.grid)
    out_dir = Path(args.out)
    runs_dir = os.path.abspath(args.runs_dir or str(out_dir / "runs"))
    config, _ = load_config(args.config, list(args.overrides))
    trials = build_trials(args.config, grid, list(args.overrides), runs_dir, args.name)
    res = {str(k): float(v) for k, v in config.scale.resources_per_worker.items()}
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else res.get("CPU", 1.0)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else res.get("GPU", 1.0 if config.scale.use_gpu else 0.0)
    resources = {"cpu": cpus, "gpu": gpus, **{k: v for k, v in res.items() if k not in ("CPU", "GPU")}}
    os.environ["METAREASON_TRIAL_THREADS"] = str(max(1, int(cpus)))
    command = "metareason " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "metareason sweep"
    print(f"[sweep] {len(trials)} trials ({', '.join(f'{k}: {len(v)}' for k, v in grid)}), {resources} each",
          file=sys.stderr, flush=True)
    started = connect(args.ray)
    try:
        outcomes = run_trials(run_trial, trials, resources, str(out_dir / ".tune"), args.name, resume=args.resume,
                              max_concurrent=args.max_concurrent)
    finally:
        if started:
            import ray

            ray.shutdown()
    path = write_report(trials, outcomes, out_dir, args.name, command, grid)
    print(f"report: {path}")
    failed = [t["run_name"] for t, o in zip(trials, outcomes) if not o.ok]
    if failed:
        print(f"error: {len(failed)} of {len(trials)} trials failed: {', '.join(failed)} (see the report)",
              file=sys.stderr)
        return 1
    return 0
