"""``metareason lru sweep CONFIG_DIR``: train every group config, then one report.

Each ``*.yaml`` in the directory is one group (label from its ``lru.group``, else the file
name). Each group runs in its own process: ``metareason run CONFIG`` then ``metareason lru stats
RUN_DIR`` (per-level LRU statistics and the parameter count). With Ray installed the pair runs as
a Ray Tune trial (``metareason.scale.tune``, the engine of ``metareason sweep``) with 2 CPUs on a
local Ray runtime, so groups run one at a time and their timings are comparable; without Ray, as
plain subprocesses one after the other. The report
(:mod:`.sweep_report`) is written when all groups are done, also when some failed (their error is
in it, and the command exits 1).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from metareason.errors import UserError

TAIL = 4000  # characters of a failed process's output kept in the report


@dataclass
class GroupSpec:
    group: str
    description: str
    config: str  # path of the YAML file
    name: str  # run name (runs_dir/name is the run directory)
    run_dir: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class GroupResult:
    spec: GroupSpec
    ok: bool
    train_wall_s: float
    stats_wall_s: float
    error: Optional[str] = None


def read_specs(config_dir: str, runs_dir: str, overrides: list[str]) -> list[GroupSpec]:
    """Validate every config of the directory up front (one-line errors naming the file)."""
    from metareason.config import load_config

    root = Path(config_dir)
    if not root.is_dir():
        raise UserError(f"{config_dir}: not a directory of run configs")
    files = sorted(p for p in root.glob("*.yaml") if p.is_file())
    if not files:
        raise UserError(f"{config_dir}: no *.yaml run configs")
    specs, seen = [], {}
    for path in files:
        run_overrides = [f"output_dir={runs_dir}", *overrides]
        config, _ = load_config(path, run_overrides)
        section = getattr(config, "lru", None)
        if section is None:
            raise UserError(f"{path}: the lru plugin is not enabled for this config (plugins:)")
        group = section.group or path.stem
        if group in seen:
            raise UserError(f"{path}: lru.group {group!r} is also used by {seen[group]}")
        seen[group] = str(path)
        specs.append(GroupSpec(group, section.description, str(path), config.name, str(config.run_dir), run_overrides))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{config_dir}: two configs have the run name {dup!r} (set distinct `name:`)")
    return specs


def _tail(text: str) -> str:
    return text[-TAIL:] if len(text) > TAIL else text


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the process that started it dies (a cancelled Ray
    worker, an interrupted sweep), so no training run outlives the sweep."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=preexec)


def run_group(spec: dict, env: dict) -> dict:
    """Train one group and compute its LRU statistics, each in a fresh interpreter."""
    cli = [sys.executable, "-m", "metareason"]
    t0 = time.perf_counter()
    train = _run(cli + ["run", spec["config"], *spec["overrides"], "quiet=true"], env)
    t1 = time.perf_counter()
    if train.returncode != 0:
        return {"ok": False, "train_wall_s": t1 - t0, "stats_wall_s": 0.0,
                "error": f"metareason run exited {train.returncode}:\n{_tail(train.stderr + train.stdout)}"}
    stats = _run(cli + ["lru", "stats", spec["run_dir"]], env)
    t2 = time.perf_counter()
    if stats.returncode != 0:
        return {"ok": False, "train_wall_s": t1 - t0, "stats_wall_s": t2 - t1,
                "error": f"metareason lru stats exited {stats.returncode}:\n{_tail(stats.stderr + stats.stdout)}"}
    return {"ok": True, "train_wall_s": t1 - t0, "stats_wall_s": t2 - t1, "error": None}


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _group_trial(payload: tuple[dict, dict]) -> dict:
    return run_group(*payload)


def _run_with_ray(specs: list[GroupSpec], env: dict, log, storage: str) -> list[dict]:
    """Each group is a Ray Tune trial (``metareason.scale.tune.run_trials``) with 2 CPUs."""
    from metareason.scale.runtime import connect
    from metareason.scale.tune import run_trials

    # Ray lowers its workers' priority (niceness 15) by default; the training processes they
    # start would inherit it and lose the CPU to anything else running, unlike the subprocess
    # launcher; connect() keeps them at the driver's priority unless the user says otherwise.
    # num_cpus=2 per trial on a 2-CPU runtime: one group at a time, each with the whole machine.
    started = connect(None, num_cpus=2)
    try:
        outcomes = run_trials(_group_trial, [(asdict(s), env) for s in specs], {"cpu": 2}, storage, "lru-sweep")
    finally:
        if started:
            import ray

            ray.shutdown()
    results = []
    for spec, outcome in zip(specs, outcomes):
        if outcome.ok:
            res = {k: outcome.metrics.get(k) for k in ("ok", "train_wall_s", "stats_wall_s", "error")}
        else:
            res = {"ok": False, "train_wall_s": 0.0, "stats_wall_s": 0.0, "error": f"Ray trial failed: {outcome.error}"}
        results.append(res)
        log(spec, res)
    return results


def run_sweep(config_dir: str, out_dir: str, runs_dir: str, prefix: str, overrides: list[str],
              use_ray: Optional[bool] = None, command: str = "") -> tuple[Path, list[GroupResult]]:
    """Run every group, write the report; returns ``(report.md path, results)``."""
    from metareason.plugins.lru.sweep_report import write_report

    specs = read_specs(config_dir, runs_dir, overrides)
    use_ray = ray_available() if use_ray is None else use_ray
    if use_ray and not ray_available():
        raise UserError("--ray: ray is not installed (pip install 'metareason[ray]')")
    env = dict(os.environ)

    def log(spec, res):
        state = "ok" if res["ok"] else "FAILED"
        print(f"[lru sweep] group {spec.group} ({spec.name}): {state}, train {res['train_wall_s']:.0f} s",
              file=sys.stderr, flush=True)

    print(f"[lru sweep] {len(specs)} groups ({', '.join(s.group for s in specs)}), "
          f"{'Ray tasks (Ray Tune trials)' if use_ray else 'subprocesses'}", file=sys.stderr, flush=True)
    if use_ray:
        raw = _run_with_ray(specs, env, log, str(Path(runs_dir) / ".tune"))
    else:
        raw = []
        for spec in specs:
            raw.append(run_group(asdict(spec), env))
            log(spec, raw[-1])
    results = [GroupResult(spec, r["ok"], r["train_wall_s"], r["stats_wall_s"], r["error"]) for spec, r in zip(specs, raw)]
    path = write_report(results, Path(out_dir), prefix, command=command, launcher="ray" if use_ray else "subprocess")
    return path, results
