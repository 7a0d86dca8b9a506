"""``metareason lru sweep CONFIG_DIR``: the group comparison under one fair protocol.

Each ``*.yaml`` in the directory is one group (label from its ``lru.group``, else the file name).
The protocol (docs/lru.md, "The sweep protocol"):

1. **Same token budget.** Every group trains on the same data, batch size, sequence length and
   number of steps (checked up front; a config that differs is refused, naming the field), so
   with the same seed every group sees the same token stream.
2. **Learning rate chosen per group on validation.** For the first seed, every group trains at
   every rate of the grid (``--lrs``); each run is evaluated on the causal-loop ``validation``
   split (problems disjoint from train and test), and the rate with the highest validation
   accuracy is kept (ties: the lower validation loss). The test split is never used to choose.
   When a group's best rate is the lowest or highest it tried, its grid grows one step beyond
   that edge (up to ``--extend`` times), so the chosen rate is bracketed where the budget allows;
   the report flags a rate still at an edge.
3. **Seeds.** At its chosen rate each group trains again with the other seeds (``--seeds``).
4. **Test.** Every run at a chosen rate is evaluated on the test split; the report gives mean and
   spread over seeds (:mod:`.sweep_report`).

A *trial* is one (group, learning rate, seed): ``metareason run`` then the validation evaluation
(:mod:`.sweep_eval`), each in a fresh interpreter. Trials are independent, ``--jobs`` run at a
time (as Ray Tune trials when Ray is installed, else subprocesses), each with
``cpus // jobs`` threads. A trial whose run directory holds a finished result for the same
config and overrides is not run again, so an interrupted sweep resumes where it stopped and a
sweep can be extended (more seeds, another rate) at the cost of the new trials only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from metareason.api import UserError, atomic_dir, write_json_atomic

TAIL = 4000  # characters of a failed process's output kept in the report
BUDGET_FIELDS = (("data", "train"), ("data", "max_length"), ("train", "batch_size"), ("train", "grad_accum"),
                 ("train", "max_steps"))
TRIAL_FILE = "sweep-trial.json"
# what the report reads from a run directory (no checkpoints): what --results-dir keeps
KEPT_FILES = ("config.yaml", "metrics.jsonl", TRIAL_FILE, "sweep-validation.json", "sweep-test.json",
              "eval_samples-validation.jsonl", "eval_samples-test.jsonl")
KEPT_WEIGHTS = "checkpoint"  # --keep-weights: <results-dir>/<trial>/checkpoint/<step dir>, weights only
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng.pt")  # what evaluation does not need


@dataclass
class Plan:
    lrs: list[float]
    seeds: list[int]
    val_samples: int = 200
    test_samples: int = 400
    val_seed: int = 4321
    test_seed: int = 1234
    jobs: int = 1
    threads: int = 1  # torch threads per trial
    results_dir: Optional[str] = None  # finished trials' small files, kept (and reused) beyond the runs dir
    extend: int = 2  # times a group's grid may grow past an edge its best rate sits on
    keep_weights: bool = False  # also keep the final weights in results_dir until the test evaluation is done


@dataclass
class GroupSpec:
    group: str
    description: str
    config: str  # path of the YAML file
    name: str  # base run name; trials are <name>-lr<lr>-s<seed>
    overrides: list[str] = field(default_factory=list)
    budget: dict = field(default_factory=dict)


@dataclass
class Trial:
    group: str
    config: str
    lr: float
    seed: int
    name: str
    run_dir: str
    overrides: list[str]
    fingerprint: str


@dataclass
class TrialResult:
    trial: Trial
    ok: bool
    resumed: bool = False
    train_wall_s: float = 0.0
    eval_wall_s: float = 0.0
    error: Optional[str] = None


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{what}: expected positive numbers, got {text!r}")
    return sorted(set(values))


def parse_seeds(text: str) -> list[int]:
    """``"2"``: seeds 0 and 1; ``"0,3,7"``: those seeds."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected a count >= 1 or a comma-separated list of seeds, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct seeds, got {text!r}")
    return seeds


def _get(cfg: dict, path: tuple[str, ...]):
    node = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def read_specs(config_dir: str, runs_dir: str, overrides: list[str], groups: Optional[list[str]] = None) -> list[GroupSpec]:
    """Validate every config of the directory up front (one-line errors naming the file)."""
    from metareason.api import load_config

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
        dumped = config.model_dump(mode="json")
        for i, entry in enumerate(dumped["data"]["train"]):
            if entry.get("task") == "causal_loop" and not (entry.get("params") or {}).get("val_fraction"):
                raise UserError(f"{path}: data.train[{i}].params.val_fraction: the sweep chooses learning rates "
                                f"on a validation split cut out of train; set it (e.g. 0.1)")
        if not dumped["data"]["eval"]:
            raise UserError(f"{path}: data.eval: the sweep evaluates on the first eval entry; none is set")
        budget = {".".join(f): _get(dumped, f) for f in BUDGET_FIELDS}
        specs.append(GroupSpec(group, section.description, str(path), config.name, run_overrides, budget))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{config_dir}: two configs have the run name {dup!r} (set distinct `name:`)")
    first = specs[0]
    for spec in specs[1:]:
        for key, value in spec.budget.items():
            if value != first.budget[key]:
                raise UserError(f"{spec.config}: {key} differs from {first.config}'s: every group gets the same "
                                f"token budget (same data, batch, length and steps)")
    if groups:
        unknown = sorted(set(groups) - {s.group for s in specs})
        if unknown:
            raise UserError(f"--groups: no config has lru.group {unknown[0]!r} (have {', '.join(s.group for s in specs)})")
        specs = [s for s in specs if s.group in groups]
    return specs


def make_trial(spec: GroupSpec, lr: float, seed: int, runs_dir: str) -> Trial:
    name = f"{spec.name}-lr{lr:g}-s{seed}"
    overrides = [*spec.overrides, f"train.lr={lr!r}", f"train.seed={seed}", f"name={name}", "eval.at_end=false",
                 "quiet=true"]
    text = Path(spec.config).read_text(encoding="utf-8")
    fingerprint = hashlib.sha256(json.dumps([text, overrides]).encode()).hexdigest()[:16]
    return Trial(spec.group, spec.config, lr, seed, name, str(Path(runs_dir) / name), overrides, fingerprint)


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


def _eval_cmd(run_dir: str, split: str, samples: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "metareason.plugins.lru.sweep_eval", run_dir, "--split", split,
            "--samples", str(samples), "--seed", str(seed)]


def _done(trial: dict) -> Optional[dict]:
    marker = Path(trial["run_dir"]) / TRIAL_FILE
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = record.get("fingerprint") == trial["fingerprint"] and (Path(trial["run_dir"]) / "sweep-validation.json").exists()
    return record if ok else None


def _kept_dir(trial: dict, plan: dict) -> Optional[Path]:
    return Path(plan["results_dir"]) / trial["name"] if plan.get("results_dir") else None


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    from metareason.api import latest_checkpoint

    return latest_checkpoint(run_dir)


def keep_results(trial: dict, plan: dict) -> None:
    """Copy a finished trial's small files to ``--results-dir`` (replacing an older copy whole);
    with ``--keep-weights`` also its final weights, until it has a test result."""
    target = _kept_dir(trial, plan)
    if target is None:
        return
    run_dir = Path(trial["run_dir"])
    with atomic_dir(target, replace=True) as tmp:
        for name in KEPT_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, tmp / name)
        ckpt = _latest_checkpoint(run_dir)
        if plan.get("keep_weights") and ckpt is not None and not (run_dir / "sweep-test.json").exists():
            shutil.copytree(ckpt, tmp / KEPT_WEIGHTS / ckpt.name, ignore=shutil.ignore_patterns(*TRAINING_STATE))


def drop_kept_weights(trial: dict, plan: dict) -> None:
    """A trial not at its group's chosen rate is never evaluated on test: its kept weights go."""
    kept = _kept_dir(trial, plan)
    if kept is not None and (kept / KEPT_WEIGHTS).is_dir():
        shutil.rmtree(kept / KEPT_WEIGHTS)


def restore_results(trial: dict, plan: dict) -> bool:
    """A trial kept in ``--results-dir`` with the same fingerprint is put back into its run
    directory (with its weights when they were kept, else without checkpoints), so a sweep can be
    finished in pieces on fresh machines."""
    source = _kept_dir(trial, plan)
    if source is None or _done(trial) is not None or not (source / TRIAL_FILE).exists():
        return False
    if _done({**trial, "run_dir": str(source)}) is None:
        return False
    run_dir = Path(trial["run_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for name in KEPT_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, run_dir / name)
    if (source / KEPT_WEIGHTS).is_dir():
        from metareason.api import checkpoints_dir

        shutil.copytree(source / KEPT_WEIGHTS, checkpoints_dir(run_dir))
    return True


def run_trial(trial: dict, plan: dict, env: dict) -> dict:
    """Train one (group, lr, seed) and evaluate it on validation, unless already done."""
    restore_results(trial, plan)
    record = _done(trial)
    if record is not None:
        kept = _kept_dir(trial, plan)
        if plan.get("keep_weights") and kept is not None and not (kept / KEPT_WEIGHTS).exists() \
                and _latest_checkpoint(Path(trial["run_dir"])) is not None \
                and not (Path(trial["run_dir"]) / "sweep-test.json").exists():
            keep_results(trial, plan)  # finished before --keep-weights was given
        return {"ok": True, "resumed": True, "train_wall_s": record["train_wall_s"],
                "eval_wall_s": record["eval_wall_s"], "error": None}
    run_dir = Path(trial["run_dir"])
    if run_dir.exists():  # a stale or interrupted trial: start it over
        shutil.rmtree(run_dir)
    cli = [sys.executable, "-m", "metareason"]
    t0 = time.perf_counter()
    train = _run(cli + ["run", trial["config"], *trial["overrides"]], env)
    t1 = time.perf_counter()
    if train.returncode != 0:
        return {"ok": False, "train_wall_s": t1 - t0, "eval_wall_s": 0.0,
                "error": f"metareason run exited {train.returncode}:\n{_tail(train.stderr + train.stdout)}"}
    ev = _run(_eval_cmd(trial["run_dir"], "validation", plan["val_samples"], plan["val_seed"]), env)
    t2 = time.perf_counter()
    if ev.returncode != 0:
        return {"ok": False, "train_wall_s": t1 - t0, "eval_wall_s": t2 - t1,
                "error": f"validation evaluation exited {ev.returncode}:\n{_tail(ev.stderr + ev.stdout)}"}
    record = {"fingerprint": trial["fingerprint"], "train_wall_s": t1 - t0, "eval_wall_s": t2 - t1}
    write_json_atomic(run_dir / TRIAL_FILE, record, indent=None)
    keep_results(trial, plan)
    return {"ok": True, "resumed": False, **{k: record[k] for k in ("train_wall_s", "eval_wall_s")}, "error": None}


def run_test_eval(trial: dict, plan: dict, env: dict) -> dict:
    target = Path(trial["run_dir"]) / "sweep-test.json"
    if target.exists():
        try:
            if json.loads(target.read_text(encoding="utf-8")).get("samples") == plan["test_samples"]:
                return {"ok": True, "resumed": True, "error": None}
        except ValueError:
            pass
    if not (Path(trial["run_dir"]) / "checkpoints").is_dir():
        return {"ok": False, "error": f"{trial['run_dir']}: no checkpoint to evaluate on the test split (the trial was "
                                      f"restored from --results-dir before its test evaluation, without --keep-weights); delete "
                                      f"{_kept_dir(trial, plan)} to train it again"}
    t0 = time.perf_counter()
    ev = _run(_eval_cmd(trial["run_dir"], "test", plan["test_samples"], plan["test_seed"]), env)
    if ev.returncode != 0:
        return {"ok": False, "error": f"test evaluation exited {ev.returncode}:\n{_tail(ev.stderr + ev.stdout)}"}
    keep_results(trial, plan)
    return {"ok": True, "resumed": False, "wall_s": time.perf_counter() - t0, "error": None}


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _trial_task(payload: tuple) -> dict:
    fn, trial, plan, env = payload
    return {"run_trial": run_trial, "run_test_eval": run_test_eval}[fn](trial, plan, env)


class Launcher:
    """Runs a list of trial payloads ``jobs`` at a time: Ray Tune trials or threads of subprocesses."""

    def __init__(self, use_ray: bool, jobs: int, storage: str):
        self.use_ray, self.jobs, self.storage, self.started, self.stage = use_ray, jobs, storage, False, 0

    def __enter__(self):
        if self.use_ray:
            from metareason.api import connect_ray as connect

            # Ray lowers its workers' priority (niceness 15) by default; connect() keeps the
            # training processes they start at the driver's priority, like the subprocess path.
            self.started = connect(None, num_cpus=self.jobs)
        return self

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()

    def map(self, fn: str, trials: list[dict], plan: dict, env: dict, log: Callable[[dict, dict], None]) -> list[dict]:
        if not trials:
            return []
        payloads = [(fn, t, plan, env) for t in trials]
        if self.use_ray:
            from metareason.api import run_trials

            self.stage += 1
            outcomes = run_trials(_trial_task, payloads, {"cpu": 1}, self.storage, f"lru-sweep-{self.stage}",
                                  max_concurrent=self.jobs)
            results = []
            for trial, outcome in zip(trials, outcomes):
                res = ({k: outcome.metrics.get(k) for k in ("ok", "resumed", "train_wall_s", "eval_wall_s", "error")}
                       if outcome.ok else {"ok": False, "error": f"Ray trial failed: {outcome.error}"})
                log(trial, res)
                results.append(res)
            return results

        def one(payload):
            res = _trial_task(payload)
            log(payload[1], res)
            return res

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(one, payloads))


def choose_lr(trials: list[TrialResult]) -> Optional[float]:
    """Highest validation accuracy; ties: lower validation loss, then the lower rate."""
    best = None
    for r in trials:
        if not r.ok:
            continue
        val = json.loads((Path(r.trial.run_dir) / "sweep-validation.json").read_text(encoding="utf-8"))
        key = (-val["accuracy"]["all"], val["loss"].get("all", float("inf")), r.trial.lr)
        if best is None or key < best[0]:
            best = (key, r.trial.lr)
    return None if best is None else best[1]


def edge_extension(trials: list[TrialResult], grid: list[float]) -> Optional[float]:
    """The next rate to try when the best of ``trials`` is the lowest (or highest) rate tried: one
    grid step (the grid's ratio, else 2) beyond it; ``None`` when the best rate is inside."""
    best = choose_lr(trials)
    rates = sorted({r.trial.lr for r in trials if r.ok})
    if best is None or len(rates) < 2:
        return None
    ratio = grid[1] / grid[0] if len(grid) > 1 else 2.0
    if best == rates[0]:
        return float(f"{best / ratio:.6g}")
    if best == rates[-1]:
        return float(f"{best * ratio:.6g}")
    return None


def run_sweep(config_dir: str, out_dir: str, runs_dir: str, prefix: str, overrides: list[str], plan: Plan,
              use_ray: Optional[bool] = None, command: str = "", groups: Optional[list[str]] = None,
              quick: bool = False):
    """Grid on the first seed, the other seeds at the chosen rates, test evaluation, report."""
    from metareason.plugins.lru.sweep_report import write_report

    specs = read_specs(config_dir, runs_dir, overrides, groups)
    use_ray = ray_available() if use_ray is None else use_ray
    if use_ray and not ray_available():
        raise UserError("--ray: ray is not installed (pip install 'metareason[ray]')")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(plan.threads)
    plan_d = asdict(plan)

    def log(trial, res):
        state = "resumed" if res.get("resumed") else ("ok" if res["ok"] else "FAILED")
        wall = f", train {res['train_wall_s']:.0f} s" if res.get("train_wall_s") else ""
        print(f"[lru sweep] {trial['group']} lr={trial['lr']:g} seed={trial['seed']}: {state}{wall}",
              file=sys.stderr, flush=True)

    n_trials = len(specs) * (len(plan.lrs) + plan.extend + len(plan.seeds) - 1)
    print(f"[lru sweep] {len(specs)} groups ({', '.join(s.group for s in specs)}), lr grid "
          f"{', '.join(f'{lr:g}' for lr in plan.lrs)} on seed {plan.seeds[0]}, seeds {plan.seeds}; up to "
          f"{n_trials} trials, {plan.jobs} at a time as {'Ray tasks (Ray Tune trials)' if use_ray else 'subprocesses'}",
          file=sys.stderr, flush=True)
    results: list[TrialResult] = []

    def run(launcher, fn, trials):
        raw = launcher.map(fn, [asdict(t) for t in trials], plan_d, env, log)
        return [TrialResult(t, bool(r.get("ok")), bool(r.get("resumed")), r.get("train_wall_s") or 0.0,
                            r.get("eval_wall_s") or 0.0, r.get("error")) for t, r in zip(trials, raw)]

    chosen: dict[str, Optional[float]] = {}
    test_errors: dict[str, str] = {}
    with Launcher(use_ray, plan.jobs, str(Path(runs_dir).resolve() / ".tune")) as launcher:
        grid = [make_trial(s, lr, plan.seeds[0], runs_dir) for s in specs for lr in plan.lrs]
        results += run(launcher, "run_trial", grid)
        for _ in range(plan.extend):
            beyond = [make_trial(spec, lr, plan.seeds[0], runs_dir) for spec in specs
                      for lr in [edge_extension([r for r in results if r.trial.group == spec.group], plan.lrs)]
                      if lr is not None]
            if not beyond:
                break
            print(f"[lru sweep] best rate at an edge of the grid: also trying "
                  f"{', '.join(f'{t.group} lr={t.lr:g}' for t in beyond)}", file=sys.stderr, flush=True)
            results += run(launcher, "run_trial", beyond)
        for spec in specs:
            chosen[spec.group] = choose_lr([r for r in results if r.trial.group == spec.group])
        for r in results:
            if chosen.get(r.trial.group) != r.trial.lr:
                drop_kept_weights(asdict(r.trial), plan_d)
        more = [make_trial(s, chosen[s.group], seed, runs_dir) for s in specs if chosen[s.group] is not None
                for seed in plan.seeds[1:]]
        results += run(launcher, "run_trial", more)
        final = [r.trial for r in results if r.ok and chosen.get(r.trial.group) == r.trial.lr]
        for trial, res in zip(final, launcher.map("run_test_eval", [asdict(t) for t in final], plan_d, env,
                                                  lambda t, r: None)):
            if not res["ok"]:
                test_errors[trial.name] = res["error"]
    path = write_report(specs, results, chosen, test_errors, plan, Path(out_dir), prefix, command=command,
                        launcher="ray" if use_ray else "subprocess", quick=quick)
    return path, results, test_errors
