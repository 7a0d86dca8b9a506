"""Statistics of the issue 28 experiment (docs/behaviors.md, "Experiment design (issue 28)").

Read from the eval samples files (``eval_samples.jsonl``: one line per question with ``id``,
``group``, ``score``, ``gen_tokens``) that ``metareason eval RUN_DIR`` writes:

* :func:`seed_interval`: mean over seeds with a two-sided 95% t interval (n - 1 degrees of freedom);
* :func:`mcnemar`: exact McNemar test on paired correctness (the same questions);
* :func:`wilcoxon_tokens`: Wilcoxon signed-rank test on paired generated tokens;
* :func:`pair`: two runs' samples matched by ``(condition, id)``, never by position;
* :func:`holm`: Holm's step-down adjustment of a family of p-values.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence, Union


def read_samples(path: Union[str, Path]) -> dict[tuple[str, str], dict]:
    """``{(condition, id): sample}``; the condition is the group without its topic and task
    prefix (``behavior_chain/ordered/flip`` -> ``ordered``; a bare topic -> ``none``)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        s = json.loads(line)
        parts = s["group"].split("/")
        if parts[0] == "behavior_chain":
            parts = parts[1:]
        key = ("/".join(parts[:-1]) or "none", s["id"])
        if key in out:
            raise ValueError(f"{path}: {key} appears twice")
        out[key] = s
    return out


def pair(a: dict, b: dict, condition_a: str = None, condition_b: str = None) -> list[tuple[dict, dict]]:
    """Samples of ``a`` and ``b`` on the same questions: by (condition, id), or, with conditions
    given, ``a``'s ``condition_a`` against ``b``'s ``condition_b`` by id. Every question must be
    in both (a missing one is an error, not a silent drop)."""
    if condition_a is None:
        keys_a, keys_b = set(a), set(b)
        if keys_a != keys_b:
            raise ValueError(f"the runs answered different questions ({len(keys_a ^ keys_b)} differ)")
        return [(a[k], b[k]) for k in sorted(keys_a)]
    ids_a = {i for c, i in a if c == condition_a}
    ids_b = {i for c, i in b if c == condition_b}
    if ids_a != ids_b or not ids_a:
        raise ValueError(f"{condition_a} and {condition_b} cover different questions")
    return [(a[(condition_a, i)], b[(condition_b, i)]) for i in sorted(ids_a)]


def mcnemar(pairs: Iterable[tuple[dict, dict]]) -> dict:
    """Exact two-sided McNemar test: ``only_a`` / ``only_b`` are the questions only the first /
    only the second got right; p from the binomial(only_a + only_b, 1/2) distribution."""
    from metareason.api import mcnemar_exact

    only_a = only_b = 0
    for x, y in pairs:
        ra, rb = x["score"] >= 1.0, y["score"] >= 1.0
        only_a += ra and not rb
        only_b += rb and not ra
    return {"only_a": only_a, "only_b": only_b, "p_value": mcnemar_exact(only_a, only_b)}


def wilcoxon_tokens(pairs: Sequence[tuple[dict, dict]]) -> dict:
    """Wilcoxon signed-rank test on generated tokens: two-sided, zero differences dropped, ties
    given average ranks, normal approximation with the tie correction (the design's comparisons
    have hundreds of questions)."""
    da = [float(x["gen_tokens"]) for x, _ in pairs]
    db = [float(y["gen_tokens"]) for _, y in pairs]
    mean_a, mean_b = sum(da) / len(da), sum(db) / len(db)
    diffs = sorted((abs(x - y), x > y) for x, y in zip(da, db) if x != y)
    n = len(diffs)
    if n == 0:
        return {"mean_a": mean_a, "mean_b": mean_b, "n": 0, "p_value": 1.0}
    w_plus, ties, i = 0.0, 0.0, 0
    while i < n:
        j = i
        while j < n and diffs[j][0] == diffs[i][0]:
            j += 1
        rank = (i + 1 + j) / 2.0  # the average of ranks i+1 .. j
        w_plus += rank * sum(1 for k in range(i, j) if diffs[k][1])
        ties += (j - i) ** 3 - (j - i)
        i = j
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - ties / 48.0
    z = (w_plus - mean) / math.sqrt(var) if var > 0 else 0.0
    return {"mean_a": mean_a, "mean_b": mean_b, "n": n, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2.0))}


# two-sided 95% t quantiles, n - 1 degrees of freedom
_T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
         8: 2.306004, 9: 2.262157, 10: 2.228139}


def seed_interval(values: Sequence[float]) -> dict:
    """Mean over seeds and its two-sided 95% t interval (n - 1 degrees of freedom); with 3 seeds
    the multiplier is 4.30, so the interval is wide, and it is reported as it is."""
    n = len(values)
    if not 2 <= n <= 11:
        raise ValueError("an interval from seeds needs 2 to 11 seeds")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _T975[n - 1] * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "seeds": n}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1)."""
    order = sorted(p_values, key=p_values.get)
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        out[name] = running
    return out
