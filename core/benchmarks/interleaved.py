"""Interleaved timing: every candidate called once per round, so a change in machine load hits all
of them alike, and ratios are taken within a round (``bench kernels`` and its linear CE rows)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int,
                budget_s: float = 60.0) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, calls interleaved round by round after one warm-up
    call each; stops early past ``budget_s`` once 3 rounds are done."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and i >= 2:
            break
    return times


def ratio(times: dict[str, list[float]], base: str, of: str = "fused") -> tuple[float, list[float]]:
    """Median and [min, max] over rounds of ``base``'s time / ``of``'s time in the same round."""
    r = [b / f for b, f in zip(times[base], times[of])]
    return statistics.median(r), [min(r), max(r)]
