"""A behavior (name -> instruction), its validation, and the strict parsers of strategist output
and of citations in completions.

Extraction output is accepted in two forms and nothing else:

* lines ``behavior_<snake_case>: <instruction>`` (a leading ``- `` or ``* `` bullet is allowed;
  blank lines are skipped);
* a JSON list of ``{"name": ..., "instruction": ...}`` objects (or one such object).

A line or item that does not fit (no ``behavior_`` name, a name that is not snake_case, an empty
instruction, more than ``max_sentences`` sentences) is rejected and counted, never repaired.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Optional

NAME_RE = re.compile(r"^behavior_[a-z0-9]+(?:_[a-z0-9]+)*$")
_LINE_RE = re.compile(r"^\s*(?:[-*]\s+)?`?(behavior_[A-Za-z0-9_]*)`?\s*:\s*(.*?)\s*$")
_CITE_RE = re.compile(r"behavior_[a-z0-9]+(?:_[a-z0-9]+)*")
_SENTENCE_END = re.compile(r"[.!?](?:\s+|$)")


class BehaviorError(ValueError):
    """An invalid behavior (the message names the field)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BehaviorError(f"name: {name!r} is not behavior_<snake_case> (lower-case letters, digits, _)")
    return name


def sentence_count(text: str) -> int:
    """Sentences in ``text``: terminators followed by space or the end (a final unterminated
    clause counts as one)."""
    text = text.strip()
    if not text:
        return 0
    ends = len(_SENTENCE_END.findall(text))
    return ends + (0 if re.search(r"[.!?]$", text) else 1)


def check_instruction(text: str, max_sentences: int = 2) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BehaviorError("instruction: empty")
    text = " ".join(text.split())
    n = sentence_count(text)
    if n > max_sentences:
        raise BehaviorError(f"instruction: {n} sentences, at most {max_sentences} allowed")
    return text


def trace_hash(trace: str) -> str:
    return hashlib.sha256(trace.encode("utf-8")).hexdigest()[:16]


@dataclass
class Provenance:
    example_id: Optional[str] = None
    trace_hash: Optional[str] = None
    generator: Optional[str] = None
    created: float = field(default_factory=time.time)


@dataclass
class Behavior:
    name: str
    instruction: str
    topic: Optional[str] = None
    provenance: list[Provenance] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)  # further topics it serves (after merges)
    created: float = field(default_factory=time.time)
    retrieved: int = 0
    cited: int = 0
    cited_correct: int = 0
    id: Optional[int] = None

    def validate(self, max_sentences: int = 2) -> "Behavior":
        check_name(self.name)
        self.instruction = check_instruction(self.instruction, max_sentences)
        return self

    def to_json(self) -> dict:
        return {"name": self.name, "instruction": self.instruction, "topic": self.topic, "topics": self.topics,
                "created": self.created, "retrieved": self.retrieved, "cited": self.cited,
                "cited_correct": self.cited_correct,
                "provenance": [vars(p) for p in self.provenance]}

    @classmethod
    def from_json(cls, d: dict, max_sentences: int = 2) -> "Behavior":
        if not isinstance(d, dict):
            raise BehaviorError(f"expected an object, got {type(d).__name__}")
        for key in ("name", "instruction"):
            if key not in d:
                raise BehaviorError(f"{key}: missing")
        known = {"name", "instruction", "topic", "topics", "created", "retrieved", "cited", "cited_correct",
                 "provenance"}
        extra = sorted(set(d) - known)
        if extra:
            raise BehaviorError(f"{extra[0]}: unknown field")
        prov = []
        for p in d.get("provenance") or []:
            if not isinstance(p, dict) or set(p) - {"example_id", "trace_hash", "generator", "created"}:
                raise BehaviorError("provenance: expected objects with example_id, trace_hash, generator, created")
            prov.append(Provenance(**p))
        counters = {}
        for key in ("retrieved", "cited", "cited_correct"):
            v = d.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BehaviorError(f"{key}: expected a non-negative integer, got {v!r}")
            counters[key] = v
        topic = d.get("topic")
        if topic is not None and not isinstance(topic, str):
            raise BehaviorError(f"topic: expected text, got {topic!r}")
        topics = d.get("topics") or []
        if not isinstance(topics, list) or any(not isinstance(t, str) for t in topics):
            raise BehaviorError(f"topics: expected a list of text, got {topics!r}")
        created = d.get("created", time.time())
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise BehaviorError(f"created: expected a UNIX time, got {created!r}")
        return cls(name=d["name"], instruction=d["instruction"], topic=topic, topics=topics, provenance=prov,
                   created=float(created), **counters).validate(max_sentences)


@dataclass
class ParseResult:
    behaviors: list[Behavior]
    rejected: list[tuple[str, str]]  # (offending text, reason)


def _parse_json(text: str, max_sentences: int) -> Optional[ParseResult]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    out = ParseResult([], [])
    for item in items:
        try:
            if not isinstance(item, dict) or set(item) - {"name", "instruction"}:
                raise BehaviorError("expected an object with exactly name and instruction")
            out.behaviors.append(Behavior(item.get("name", ""), item.get("instruction", "")).validate(max_sentences))
        except BehaviorError as exc:
            out.rejected.append((json.dumps(item)[:200], str(exc)))
    return out


def parse_extraction(text: str, max_sentences: int = 2) -> ParseResult:
    """Behaviors in a strategist's extraction output; every other non-blank line is rejected."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        parsed = _parse_json(stripped, max_sentences)
        if parsed is not None:
            return parsed
    out = ParseResult([], [])
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE_RE.match(line)
        if m is None:
            out.rejected.append((line.strip()[:200], "not a 'behavior_<name>: <instruction>' line"))
            continue
        try:
            out.behaviors.append(Behavior(m.group(1), m.group(2)).validate(max_sentences))
        except BehaviorError as exc:
            out.rejected.append((line.strip()[:200], str(exc)))
    return out


def parse_citations(completion: str, known: Optional[set[str]] = None) -> list[str]:
    """Distinct behavior names cited in ``completion``, in order of first mention; only names in
    ``known`` when given (a name the model made up is not a citation)."""
    seen: dict[str, None] = {}
    for m in _CITE_RE.finditer(completion):
        name = m.group(0)
        if known is None or name in known:
            seen.setdefault(name, None)
    return list(seen)


def clearer(a: str, b: str, max_sentences: int = 2) -> str:
    """The clearer of two instructions for the same behavior: one within the sentence limit
    beats one beyond it; then one that ends its sentence (not cut off); then the shorter one
    (fewer words for the same procedure); ties keep ``a`` (the stored one)."""
    def rank(t: str) -> tuple:
        return (sentence_count(t) <= max_sentences, bool(re.search(r"[.!?]$", t.strip())), -len(t.split()))
    return b if rank(b) > rank(a) else a
