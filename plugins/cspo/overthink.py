"""``causal_loop_overthink``: causal-loop traces that re-verify a correct solution 1-3 times.

The demonstration's target must "overthink" the way large reasoning models do, so that its text
hits the validation keywords where the alter can take over::

    prompt      A=3;B=A+2;C=B*2;D=C-1;D=?
    completion  B=3+2=5;C=5*2=10;D=10-1=9;wait:B=3+2=5;C=5*2=10;D=10-1=9;answer:9

Params: every ``causal_loop`` param, plus ``checks: [min, max]`` (redundant passes, default
``[1, 3]``) and ``phrases`` (what introduces a pass; each should contain one validation
keyword). The number of passes and the phrases are a pure function of ``(seed, index)``.
Examples keep the plain solution as ``solution`` and the number of passes as ``checks``.
"""
from __future__ import annotations

import hashlib
import random
from typing import Optional

from metareason.api import Task, TaskError

DEFAULT_PHRASES = ("wait", "check", "verify", "recap", "hold on")
_OWN = ("checks", "phrases")


def _parse(params: dict) -> tuple[dict, tuple[int, int], tuple[str, ...]]:
    params = dict(params or {})
    checks = params.pop("checks", [1, 3])
    phrases = params.pop("phrases", list(DEFAULT_PHRASES))
    if (not isinstance(checks, (list, tuple)) or len(checks) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in checks)
            or not 0 <= checks[0] <= checks[1] <= 8):
        raise TaskError(f"params.checks: expected [min, max] with 0 <= min <= max <= 8, got {checks!r}")
    if (not isinstance(phrases, (list, tuple)) or not phrases
            or not all(isinstance(p, str) and p and ":" not in p and ";" not in p for p in phrases)):
        raise TaskError(f"params.phrases: expected a list of non-empty strings without ':' or ';', got {phrases!r}")
    return params, (int(checks[0]), int(checks[1])), tuple(phrases)


def overthink(solution: str, passes: list[str]) -> str:
    """``solution`` (``steps;answer:N``) with one redundant pass per phrase before the answer."""
    body, sep, answer = solution.rpartition("answer:")
    if not sep:
        raise ValueError(f"solution has no 'answer:' marker: {solution!r}")
    steps = body.rstrip(";")
    return body + "".join(f"{p}:{steps};" for p in passes) + sep + answer


class OverthinkTask(Task):
    name = "causal_loop_overthink"

    def __init__(self, base: Task, seed: int, checks: tuple[int, int], phrases: tuple[str, ...]):
        self.base, self.seed, self.checks, self.phrases = base, int(seed), checks, phrases

    @property
    def examples(self):  # type: ignore[override]
        return self

    def __len__(self) -> int:
        return len(self.base)

    def example(self, i: int) -> dict:
        ex = dict(self.base[i])
        digest = hashlib.blake2b(f"overthink/{self.seed}/{i}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        k = rng.randint(*self.checks)
        passes = [rng.choice(self.phrases) for _ in range(k)]
        ex["solution"] = ex["completion"]
        ex["completion"] = overthink(ex["completion"], passes)
        ex["checks"] = k
        ex["id"] = ex["id"].replace("causal_loop/", "causal_loop_overthink/", 1)
        return ex

    def groups(self) -> list[str]:
        return self.base.groups()

    def extract_answer(self, completion: str) -> Optional[str]:
        return self.base.extract_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        return self.base.score(completion, example)


def make_task(params: dict, seed: int, num_samples: int) -> OverthinkTask:
    from metareason.api import make_causal_loop_task as make_causal_loop

    base_params, checks, phrases = _parse(params)
    if base_params.get("solution") is False:
        raise TaskError("params.solution: must be true (the overthinking traces are solutions)")
    return OverthinkTask(make_causal_loop(base_params, seed, num_samples), seed, checks, phrases)
