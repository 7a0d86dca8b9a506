"""Trials on Ray Tune: each trial is one call of a Python function with its own resources.

:func:`run_trials` is what ``metareason sweep`` (a config grid) and ``metareason lru sweep``
(a directory of group configs) share: a grid over trial indices, ``tune.with_resources``,
no retries of a failed trial (it is reported, the others go on), and an experiment directory
under ``storage`` so that an interrupted sweep resumes (finished trials are not run again).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass
class TrialOutcome:
    index: int
    ok: bool
    metrics: dict = field(default_factory=dict)
    error: Optional[str] = None


def _trainable(fn: Callable[[Any], dict], payloads: list, cwd: str):
    def trial(config: dict) -> None:
        from ray import tune

        if os.path.isdir(cwd):
            os.chdir(cwd)  # Tune starts a trial in its own directory; paths resolve as on the driver
        t0 = time.perf_counter()
        out = dict(fn(payloads[config["trial"]]) or {})
        out.setdefault("trial_wall_s", time.perf_counter() - t0)
        tune.report(out)

    return trial


def first_line(text: str, limit: int = 300) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return (lines[-1] if lines else str(text))[:limit]


def run_trials(fn: Callable[[Any], dict], payloads: list, resources: dict[str, float], storage: str, name: str,
               resume: bool = False, max_concurrent: Optional[int] = None) -> list[TrialOutcome]:
    """Run ``fn(payload)`` for every payload as a Tune trial; outcomes in payload order.

    ``resources``: Tune's per-trial resources (``{"cpu": 1, "gpu": 0, ...}``). A trial whose
    function raises is an ERROR trial (reported with its error); the sweep goes on.
    """
    from ray import tune

    storage = os.path.abspath(storage)
    path = os.path.join(storage, name)
    trainable = tune.with_resources(_trainable(fn, payloads, os.getcwd()), resources)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        if Path(path).exists():
            import shutil

            shutil.rmtree(path)
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(list(range(len(payloads))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=False),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    outcomes: dict[int, TrialOutcome] = {}
    for result in grid:
        index = int(result.config["trial"])
        if result.error is not None:
            outcomes[index] = TrialOutcome(index, False, {}, f"{type(result.error).__name__}: "
                                                            f"{first_line(str(result.error))}")
        else:
            metrics = {k: v for k, v in (result.metrics or {}).items()
                       if not k.startswith(("time_", "timestamp", "date", "hostname", "node_ip", "pid",
                                            "training_iteration", "iterations_since", "done", "config",
                                            "trial_id", "checkpoint_dir_name", "should_checkpoint"))}
            outcomes[index] = TrialOutcome(index, True, metrics)
    return [outcomes.get(i, TrialOutcome(i, False, {}, "the trial did not run")) for i in range(len(payloads))]
