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
import math
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
        """Check every field (type and range; text must be valid Unicode); the error names it."""
        check_name(self.name)
        self.instruction = check_text(check_instruction(self.instruction, max_sentences), "instruction")
        check_text(self.topic, "topic", optional=True)
        if not isinstance(self.topics, list):
            raise BehaviorError(f"topics: expected a list of text, got {_short(self.topics)}")
        for i, t in enumerate(self.topics):
            check_text(t, f"topics[{i}]")
        self.created = check_time(self.created, "created")
        for key in ("retrieved", "cited", "cited_correct"):
            check_count(getattr(self, key), key)
        if not isinstance(self.provenance, list):
            raise BehaviorError(f"provenance: expected a list, got {_short(self.provenance)}")
        for i, p in enumerate(self.provenance):
            if not isinstance(p, Provenance):
                raise BehaviorError(f"provenance[{i}]: expected a provenance record, got {_short(p)}")
            for key in ("example_id", "trace_hash", "generator"):
                check_text(getattr(p, key), f"provenance[{i}].{key}", optional=True)
            p.created = check_time(p.created, f"provenance[{i}].created")
        return self

    def to_json(self) -> dict:
        return {"name": self.name, "instruction": self.instruction, "topic": self.topic, "topics": self.topics,
                "created": self.created, "retrieved": self.retrieved, "cited": self.cited,
                "cited_correct": self.cited_correct,
                "provenance": [vars(p) for p in self.provenance]}

    @classmethod
    def from_json(cls, d: dict, max_sentences: int = 2) -> "Behavior":
        """A behavior from one decoded JSONL object: unknown or missing fields, wrong types and
        out-of-range values are errors naming the field (never repaired)."""
        if not isinstance(d, dict):
            raise BehaviorError(f"expected an object, got {type(d).__name__}")
        for key in ("name", "instruction"):
            if key not in d:
                raise BehaviorError(f"{key}: missing")
        extra = sorted(set(d) - _FIELDS)
        if extra:
            raise BehaviorError(f"{extra[0]}: unknown field")
        raw_prov = d.get("provenance")
        if raw_prov is None:
            raw_prov = []
        if not isinstance(raw_prov, list):
            raise BehaviorError(f"provenance: expected a list of objects, got {_short(raw_prov)}")
        prov = []
        for i, p in enumerate(raw_prov):
            if not isinstance(p, dict):
                raise BehaviorError(f"provenance[{i}]: expected an object, got {_short(p)}")
            extra = sorted(set(p) - _PROVENANCE_FIELDS)
            if extra:
                raise BehaviorError(f"provenance[{i}].{extra[0]}: unknown field "
                                    f"(expected {', '.join(sorted(_PROVENANCE_FIELDS))})")
            prov.append(Provenance(**p))
        topics = d.get("topics")
        counters = {key: d.get(key, 0) for key in ("retrieved", "cited", "cited_correct")}
        return cls(name=d["name"], instruction=d["instruction"], topic=d.get("topic"),
                   topics=[] if topics is None else topics, provenance=prov,
                   created=d.get("created", time.time()), **counters).validate(max_sentences)


_FIELDS = {"name", "instruction", "topic", "topics", "created", "retrieved", "cited", "cited_correct", "provenance"}
_PROVENANCE_FIELDS = {"example_id", "trace_hash", "generator", "created"}
#: the range of a stored counter (SQLite INTEGER) and of a stored time (UNIX seconds up to 9999-12-31)
MAX_COUNT = 2 ** 63 - 1
MAX_TIME = 253402300799.0


def _short(value, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "an integer with too many digits"
    return text if len(text) <= limit else text[:limit] + "..."


def check_text(value, field: str, optional: bool = False):
    """Text that can be stored: a ``str`` that is valid Unicode (no lone surrogates: JSON's
    ``"\\ud800"`` decodes to one and cannot be written as UTF-8)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BehaviorError(f"{field}: expected text, got {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BehaviorError(f"{field}: not valid Unicode ({exc.reason} at character {exc.start})") from None
    return value


def check_time(value, field: str) -> float:
    """A UNIX time: a finite number of seconds from 0 to the end of year 9999."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BehaviorError(f"{field}: expected a UNIX time in seconds, got {_short(value)}")
    if isinstance(value, int) and not 0 <= value <= MAX_TIME:
        raise BehaviorError(f"{field}: {_short(value)} is out of range (a UNIX time from 0 to {MAX_TIME:.0f})")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= MAX_TIME):
        raise BehaviorError(f"{field}: {_short(value)} is out of range (a UNIX time from 0 to {MAX_TIME:.0f})")
    return value


def check_count(value, field: str) -> int:
    """A counter: an integer from 0 to 2**63 - 1 (what SQLite stores)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BehaviorError(f"{field}: expected a non-negative integer, got {_short(value)}")
    if not 0 <= value <= MAX_COUNT:
        raise BehaviorError(f"{field}: {_short(value)} is out of range (0 to 2**63-1)")
    return value


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
