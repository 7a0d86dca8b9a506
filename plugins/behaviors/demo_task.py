"""``behavior_chain``: a synthetic task whose solutions reuse named sub-procedures, with a
programmatic strategist and teacher (python generator backend) for the demonstration.

A question names a *topic* and a number (``Q: fold 472``); each topic is a fixed chain of 2-3
of four digit procedures (``rev`` reverse, ``sort`` digits ascending, ``dsum`` digit sum,
``dbl`` double), so the same sub-procedures recur across many problems. The reference
solution works each procedure out long-hand::

    rev 472: 2 7 4 -> 274. dbl 274: 4*2=8 7*2=14 2*2+1=5 -> 548. answer 548

The behavior of a procedure (``behavior_rev: reverse the digits.``) lets a solver skip the
derivation and write the cited result (``behavior_rev 274.``). The programmatic teacher does
exactly that for each procedure whose behavior is in its prompt's BCI block and works the
others out long-hand; the programmatic strategist solves long-hand, reflects, and extracts one
behavior per procedure its solution used.

Params: ``split`` (train | test; disjoint numbers), ``topics`` (default all six).
"""
from __future__ import annotations

import random
import re
from typing import Optional

from metareason.data.base import Task, TaskError

PROCEDURES = {
    "rev": "reverse the digits.",
    "sort": "sort the digits ascending.",
    "dsum": "add up the digits.",
    "dbl": "double the number.",
}
TOPICS = {
    "mirror": ("rev", "dbl"),
    "tally": ("dbl", "dsum"),
    "rank": ("sort", "rev"),
    "fold": ("rev", "dbl", "dsum"),
    "stack": ("sort", "dbl"),
    "sweep": ("dbl", "rev"),
}
_Q = re.compile(r"Q: ([a-z]+) (\d+)")
_ANSWER = re.compile(r"answer (-?\d+)\s*$")


def behavior_name(op: str) -> str:
    return f"behavior_{op}"


def apply(op: str, n: int) -> int:
    s = str(n)
    if op == "rev":
        return int(s[::-1])
    if op == "sort":
        return int("".join(sorted(s)))
    if op == "dsum":
        return sum(int(c) for c in s)
    if op == "dbl":
        return 2 * n
    raise ValueError(op)


def long_hand(op: str, n: int) -> str:
    """The derivation of one procedure, step by step."""
    s = str(n)
    if op == "rev":
        work = " ".join(reversed(s))
    elif op == "sort":
        work = " ".join(sorted(s))
    elif op == "dsum":
        acc, parts = int(s[0]), []
        for c in s[1:]:
            parts.append(f"{acc}+{c}={acc + int(c)}")
            acc += int(c)
        work = " ".join(parts) if parts else s
    else:  # dbl, right to left with the carry
        carry, parts = 0, []
        for c in reversed(s):
            v = int(c) * 2 + carry
            parts.append(f"{c}*2{'+1' if carry else ''}={v}")
            carry = v // 10
        work = " ".join(parts)
    return f"{op} {n}: {work} -> {apply(op, n)}."


def solve(topic: str, n: int, known: frozenset = frozenset()) -> tuple[str, int]:
    """The solution of a question; procedures whose behavior name is in ``known`` are cited."""
    parts, x = [], n
    for op in TOPICS[topic]:
        y = apply(op, x)
        parts.append(f"{behavior_name(op)} {y}." if behavior_name(op) in known else long_hand(op, x))
        x = y
    return " ".join(parts + [f"answer {x}"]), x


def prompt_of(topic: str, n: int) -> str:
    return f"Q: {topic} {n}\nA: "


def _in_split(n: int, split: str) -> bool:
    return ((n * 2654435761) % 1000 < 800) == (split == "train")


class BehaviorChainTask(Task):
    name = "behavior_chain"

    def extract_answer(self, completion: str) -> Optional[str]:
        m = _ANSWER.search(completion.strip())
        return m.group(1) if m else None


def make_task(params: dict, seed: int, num_samples: int) -> BehaviorChainTask:
    params = dict(params or {})
    unknown = sorted(set(params) - {"split", "topics", "name"})
    if unknown:
        raise TaskError(f"params.{unknown[0]}: unknown parameter (known: split, topics)")
    split = params.get("split", "train")
    if split not in ("train", "test"):
        raise TaskError(f"params.split: expected train or test, got {split!r}")
    topics = params.get("topics", list(TOPICS))
    if not isinstance(topics, list) or not topics or any(t not in TOPICS for t in topics):
        raise TaskError(f"params.topics: expected a list of {', '.join(TOPICS)}, got {topics!r}")
    numbers = [n for n in range(100, 1000) if _in_split(n, split)]
    pool = [(t, n) for t in topics for n in numbers]
    rng = random.Random(seed)
    rng.shuffle(pool)
    pool = pool[: min(num_samples, len(pool))] if num_samples else pool
    examples = []
    for t, n in pool:
        completion, answer = solve(t, n)
        examples.append({"id": f"behavior_chain/{t}/{n}", "prompt": prompt_of(t, n), "completion": completion,
                         "answer": str(answer), "group": t, "topic": t})
    return BehaviorChainTask(examples)


# ------------------------------------------------------------------ programmatic generators
def _question(prompt: str) -> tuple[str, int]:
    found = _Q.findall(prompt)
    if not found:
        raise ValueError("no 'Q: <topic> <number>' in the prompt")
    topic, n = found[-1]
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}")
    return topic, int(n)


def teacher(prompt, **_) -> str:
    """Answers a question; cites (and skips the derivation of) every procedure whose behavior
    appears in the prompt (the BCI block), works the others out long-hand."""
    known = frozenset(re.findall(r"behavior_[a-z0-9_]+", prompt.split("Q: ")[0]))
    topic, n = _question(prompt)
    return solve(topic, n, known)[0]


def strategist(prompt, **_) -> str:
    """Solve / reflect / extract, told apart by the default templates' wording."""
    topic, n = _question(prompt)
    if "Reflection:" in prompt:  # extract
        return "\n".join(f"{behavior_name(op)}: {PROCEDURES[op]}" for op in dict.fromkeys(TOPICS[topic]))
    if "Reflect on" in prompt:
        ops = ", ".join(TOPICS[topic])
        return f"Correct. The steps {ops} are generic procedures derived at length each time."
    return solve(topic, n)[0]
