"""What the generated steps say: counts of memory / reason steps per answer, whether each step's
type token matches the gold step's type, and error attribution.

Error attribution (for an example with gold steps, i.e. a task with known facts): a wrong answer
is caused by the first generated step that differs from the gold step at the same position (a
missing step differs); the cause is that gold step's type, ``memory`` (a wrong or missing recalled
fact) or ``reason`` (a wrong operation on what was recalled). A wrong answer whose steps all equal
the gold steps is ``neither`` (the answer line itself is wrong). Shares are over wrong answers.
The rule reads the step texts, not the type tokens, so it applies to plain CoT output as well.

Fine attribution (``attribute_error_fine``; memory steps written "<Entity> has <n> <attribute>.",
as in the synthetic world) splits the same first differing step further: ``entity`` (a fact of
another entity or attribute recalled where a fact was due), ``value`` (the right entity and
attribute, a wrong value), ``operation`` (a wrong reason step: operator, operands or result),
``structure`` (the step is missing, or of the other kind: a fact where an operation was due or the
other way round, or unreadable where a fact was due), ``other`` (a gold memory step that is not a
"has" sentence: free-text data), ``neither`` (all steps right, answer line wrong).
"""
from __future__ import annotations

import re
from typing import Optional

from metareason.plugins.memory_reason.steps import Step, parse_generated

CAUSES = ("memory", "reason", "neither")
FINE_CAUSES = ("entity", "value", "operation", "structure", "other", "neither")
_FACT = re.compile(r"^([A-Za-z]+) has (-?\d+) ([A-Za-z]+)\.?$")


def _norm(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def attribute_error(generated: list[Step], gold: list[dict]) -> str:
    body = [s for s in generated if s.type != "answer"]
    for i, g in enumerate(gold):
        if i >= len(body) or _norm(body[i].text) != _norm(g["text"]):
            return g["type"]
    return "neither"


def attribute_error_fine(generated: list[Step], gold: list[dict]) -> str:
    """One of ``FINE_CAUSES`` for a wrong answer (see the module docstring)."""
    body = [s for s in generated if s.type != "answer"]
    for i, g in enumerate(gold):
        if i >= len(body):
            return "structure"
        if _norm(body[i].text) == _norm(g["text"]):
            continue
        got = _FACT.match(" ".join(body[i].text.split()))
        if g["type"] == "reason":
            return "structure" if got else "operation"
        want = _FACT.match(" ".join(g["text"].split()))
        if want is None:
            return "other"
        if got is None:
            return "structure"
        if (got.group(1).lower(), got.group(3).lower()) != (want.group(1).lower(), want.group(3).lower()):
            return "entity"
        return "value"
    return "neither"


def analyse(samples: list[dict], voc, answer_prefix: str) -> dict:
    """Aggregates over eval samples (dicts with ``completion``, ``score``, ``example``)."""
    n = len(samples)
    counts = {"memory": 0, "reason": 0, "steps": 0}
    typed, typed_right = 0, 0
    causes = {c: 0 for c in CAUSES}
    fine = {c: 0 for c in FINE_CAUSES}
    wrong, attributable = 0, 0
    for s in samples:
        steps = parse_generated(s["completion"], voc, answer_prefix)
        body = [st for st in steps if st.type != "answer"]
        counts["steps"] += len(body)
        counts["memory"] += sum(st.type == "memory" for st in body)
        counts["reason"] += sum(st.type == "reason" for st in body)
        gold = (s.get("example") or {}).get("cot_steps")
        if gold:
            for st, g in zip(body, gold):
                if st.type is not None:
                    typed += 1
                    typed_right += st.type == g["type"]
        if s["score"] < 1.0:
            wrong += 1
            if gold:
                attributable += 1
                causes[attribute_error(steps, gold)] += 1
                fine[attribute_error_fine(steps, gold)] += 1
    out = {"memory_steps": counts["memory"] / max(n, 1), "reason_steps": counts["reason"] / max(n, 1),
           "steps": counts["steps"] / max(n, 1), "wrong": wrong, "attributed": attributable}
    if typed:
        out["type_accuracy"] = typed_right / typed
    for c in CAUSES:
        out[f"error_{c}"] = causes[c] / attributable if attributable else 0.0
    for c in FINE_CAUSES[:-1]:  # error_neither is the same share in both rules
        out[f"error_{c}"] = fine[c] / attributable if attributable else 0.0
    return out


def metric_names(stats: dict, prefix: str = "eval/memory_reason/") -> dict:
    return {prefix + k: float(v) for k, v in stats.items()}


def first_cause(sample: dict, voc, answer_prefix: str) -> Optional[str]:
    gold = (sample.get("example") or {}).get("cot_steps")
    if sample["score"] >= 1.0 or not gold:
        return None
    return attribute_error(parse_generated(sample["completion"], voc, answer_prefix), gold)
