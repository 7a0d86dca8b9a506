"""Statistics of the issue-29 experiment (docs/memory_reason.md, "Experiment design"): per-question
correctness of several seeds read from runs' ``eval_samples.jsonl``, a bootstrap interval over
questions, a paired sign-flip permutation test and exact McNemar tests on the same questions, and
Holm's correction.

Correctness is a matrix ``[seeds, questions]`` of 0/1 with the questions in one fixed order (by id),
the same for every arm: all comparisons are paired on the same questions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_scores(run_dir) -> dict[str, float]:
    """``{question id: score}`` of a run's last evaluation."""
    rows = [json.loads(line) for line in (Path(run_dir) / "eval_samples.jsonl").read_text().splitlines() if line]
    return {r["id"]: float(r["score"]) for r in rows}


def correctness(run_dirs: list, ids: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``[seeds, questions]`` of the runs (one per seed); every run must have scored the same questions."""
    per_seed = [read_scores(d) for d in run_dirs]
    if ids is None:
        ids = sorted(per_seed[0])
    for d, scores in zip(run_dirs, per_seed):
        if set(scores) != set(ids):
            raise ValueError(f"{d}: its questions differ from the others' ({len(scores)} vs {len(ids)})")
    return np.array([[s[i] for i in ids] for s in per_seed]), ids


def bootstrap_ci(values: np.ndarray, n: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean over questions of ``values`` (``[seeds, questions]`` or ``[questions]``,
    averaged over seeds), resampling questions (the same resample for every seed)."""
    per_q = np.asarray(values, dtype=float)
    if per_q.ndim == 2:
        per_q = per_q.mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_q), size=(n, len(per_q)))
    means = per_q[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def sign_flip_p(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> float:
    """Two-sided p of a paired permutation test: the per-question difference of correctness
    (averaged over seeds) has its sign flipped at random; p = share of flips whose |mean| reaches
    the observed one (with the observed counted, so p > 0)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim == 2:
        d = d.mean(0)
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n, len(d)))
    flipped = np.abs((signs * d).mean(1))
    return float((1 + np.sum(flipped >= observed - 1e-12)) / (n + 1))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test of one seed's 0/1 correctness on the same questions: (a right and b
    wrong, b right and a wrong, two-sided binomial p)."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    from metareason.api import mcnemar_exact as p_value

    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return n01, n10, p_value(n01, n10)


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Holm's step-down correction: which hypotheses are rejected at family-wise ``alpha``."""
    order = sorted(pvalues, key=pvalues.get)
    out, going = {}, True
    for i, name in enumerate(order):
        going = going and pvalues[name] <= alpha / (len(order) - i)
        out[name] = going
    return out


def compare(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> dict:
    """Arm a vs arm b (``[seeds, questions]`` each, same questions and seeds): the mean difference,
    its bootstrap interval, the sign-flip p, and McNemar per seed."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"arms differ in shape: {a.shape} vs {b.shape}")
    diff = a - b
    return {"diff": float(diff.mean()), "ci": bootstrap_ci(diff, n, seed), "p_sign_flip": sign_flip_p(a, b, n, seed),
            "mcnemar": [mcnemar_exact(x, y) for x, y in zip(np.atleast_2d(a), np.atleast_2d(b))],
            "seeds_same_sign": int(np.sum(np.sign(diff.reshape(-1, diff.shape[-1]).mean(1)) == np.sign(diff.mean())))}
