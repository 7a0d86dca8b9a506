"""Reasoning steps typed memory / reason: read from data, written as training text, read back from
what a model generated.

Data: ``cot_steps: [{"type": "memory"|"rag"|"reason", "text": ...}]``, or text with step markers
``[memory]: ... [rag]: ... [reason]: ...`` (on one line or several).

Training text (step tokens on), the first step's prefix tokens being the end of the prompt::

    <memory_0..> Ava has 3 pens.
    <prefix_0..><memory_0..> Bo has 4 pens.
    <prefix_0..><reason_0..> 3+4=7
    <prefix_0..><answer_0..> The answer is: 7

Plain CoT (step tokens off): the same lines without any special token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from metareason.api import TaskError

ALIASES = {"memory": "memory", "rag": "memory", "reason": "reason"}
_MARKER = re.compile(r"\[(memory|rag|reason)\]\s*:", re.IGNORECASE)


@dataclass
class Step:
    type: Optional[str]  # memory | reason | answer | None (no type token)
    text: str
    start: int = 0  # character span of the whole line in the completion
    end: int = 0


def normalise_steps(raw: Any, where: str, memory_name: str = "memory") -> list[dict]:
    """``cot_steps`` as ``[{"type": "memory"|"reason", "text": str}]``; errors name ``where``."""
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{where}: cot_steps must be a non-empty list of {{type, text}}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "type" not in item or "text" not in item:
            raise TaskError(f"{where}: cot_steps[{i}]: expected {{\"type\": ..., \"text\": ...}}, got {item!r}")
        kind = str(item["type"]).strip().lower()
        kind = ALIASES.get(kind, "memory" if kind == memory_name.lower() else None)
        if kind is None:
            raise TaskError(f"{where}: cot_steps[{i}].type: {item['type']!r} is not memory, rag or reason")
        text = " ".join(str(item["text"]).split())
        if not text:
            raise TaskError(f"{where}: cot_steps[{i}].text: empty")
        out.append({"type": kind, "text": text})
    return out


def has_markers(text: str) -> bool:
    return bool(_MARKER.search(text or ""))


def parse_markers(text: str, where: str) -> list[dict]:
    """Steps of a text with ``[memory]:`` / ``[rag]:`` / ``[reason]:`` markers."""
    found = list(_MARKER.finditer(text))
    if not found:
        raise TaskError(f"{where}: no step marker ([memory]:, [rag]: or [reason]:)")
    if text[: found[0].start()].strip():
        raise TaskError(f"{where}: text before the first step marker: {text[: found[0].start()].strip()[:40]!r}")
    steps = []
    for k, m in enumerate(found):
        end = found[k + 1].start() if k + 1 < len(found) else len(text)
        steps.append({"type": m.group(1), "text": text[m.end(): end]})
    return normalise_steps(steps, where)


def render(steps: list[dict], answer: str, voc, step_tokens: bool, answer_prefix: str,
           first_prefix: str = "prompt") -> str:
    """The SFT completion of typed steps (see the module docstring); ``first_prefix: completion``
    starts the completion with the first step's prefix tokens instead of leaving them to the prompt."""
    lines = []
    for i, step in enumerate(steps + [{"type": "answer", "text": f"{answer_prefix}{answer}"}]):
        if not step_tokens:
            lines.append(step["text"])
            continue
        prefix = voc.prefix if i or first_prefix == "completion" else ""  # else the prompt ends with it
        lines.append(f"{prefix}{voc.types[step['type']]} {step['text']}")
    return "\n".join(lines)


def _type_pattern(voc) -> re.Pattern:
    alts = "|".join(re.escape(voc.names[t]) for t in ("memory", "reason", "answer"))
    return re.compile(r"\s*(?:<(" + alts + r")_\d+>\s*)+")


def parse_generated(text: str, voc=None, answer_prefix: str = "The answer is: ") -> list[Step]:
    """The steps of a completion, one per line, typed by their leading type tokens (when any).

    Prefix tokens (and the filler control's untyped tokens) are skipped; a line with the answer
    prefix and no type token is the answer.
    """
    by_name = {voc.names[t]: t for t in ("memory", "reason", "answer")} if voc is not None else {}
    skip = [voc.prefix_name] + ([voc.filler_name] if getattr(voc, "filler_name", "") else []) if voc is not None else []
    prefix_tok = (re.compile(r"\s*(?:<(?:" + "|".join(map(re.escape, skip)) + r")_\d+>\s*)+")
                  if voc is not None else None)
    types = _type_pattern(voc) if voc is not None else None
    steps, pos = [], 0
    for line in text.split("\n"):
        start, end = pos, pos + len(line)
        pos = end + 1
        body = line
        if prefix_tok is not None:
            m = prefix_tok.match(body)
            if m:
                body = body[m.end():]
        kind = None
        if types is not None:
            m = types.match(body)
            if m:
                kind = by_name[m.group(1)]
                body = body[m.end():]
        body = " ".join(body.split())
        if not body and kind is None:
            continue
        if kind is None and answer_prefix.strip().lower() in body.lower():
            kind = "answer"
        steps.append(Step(kind, body, start, end))
    return steps


_ANSWER = re.compile(r"answer(?: is)?\s*:\s*([^\n<]*)", re.IGNORECASE)


def extract_answer(completion: str) -> Optional[str]:
    """The text after the last ``answer is:`` (or ``answer:``), up to the line end or a token."""
    found = _ANSWER.findall(completion or "")
    if not found:
        return None
    value = found[-1].strip().rstrip(".").strip()
    return value or None


def answers_match(predicted: Optional[str], gold: Any) -> bool:
    if predicted is None:
        return False
    a, b = predicted.strip().lower(), str(gold).strip().lower()
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def plain_completion(steps: list[dict], answer: str) -> str:
    """The SFT target of typed steps: their texts, one a line, then the answer."""
    return "\n".join([s["text"] for s in steps] + [f"The answer is: {answer}"])
