"""Behavior-conditioned inference (BCI): retrieve K behaviors for a question, prepend them in the
block of ``behaviors.prompts.bci``, count what was retrieved and what completions cite.

The block (defaults; both templates are configurable)::

    Behaviors (use them where they apply and cite each one you use by its name):
    - behavior_a: instruction a
    - behavior_b: instruction b

    <the original prompt>

Retrieval is ``topic`` (the example's ``bci.topic_field``; the paper's MATH setting) or
``embedding`` (top-K cosine of the prompt against the handbook; its AIME setting). An example
with ``use_behaviors: false`` is left as it is (mixed training data), and a prompt with no
retrieved behavior is left unchanged.
"""
from __future__ import annotations

import atexit
import os
import threading
from collections import Counter
from typing import Optional

from metareason.plugins.behaviors.behavior import Behavior, parse_citations
from metareason.plugins.behaviors.config import fill

_HANDBOOKS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def shared_handbook(section):
    """One open handbook per process and (path, embedder) for the hooks."""
    from metareason.plugins.behaviors.store import HandbookError, open_handbook

    key = (os.path.abspath(os.path.expanduser(section.handbook)), section.embedder, section.merge_threshold)
    with _LOCK:
        hb = _HANDBOOKS.get(key)
        if hb is None or hb.db is None:
            if not os.path.exists(key[0]):
                raise HandbookError(f"behaviors.handbook: {section.handbook}: no such handbook "
                                    "(build one with `metareason behaviors extract` or `behaviors import`)")
            hb = _HANDBOOKS[key] = open_handbook(section, create=False)
        return hb


def close_shared() -> None:
    with _LOCK:
        for hb in _HANDBOOKS.values():
            hb.close()
        _HANDBOOKS.clear()


def render_block(section, behaviors: list[Behavior], question: str) -> str:
    lines = "\n".join(fill(section.prompts.behavior_line, name=b.name, instruction=b.instruction)
                      for b in behaviors)
    return fill(section.prompts.bci, behaviors=lines, question=question)


def retrieve(section, handbook, question: str, example: Optional[dict]) -> list[Behavior]:
    bci = section.bci
    if bci.retrieval == "topic":
        topic = (example or {}).get(bci.topic_field)
        return [] if topic is None else handbook.by_topic(str(topic), bci.k)
    return [b for b, _ in handbook.search(question, bci.k)]


class BCIState:
    """Per-process state of the hooks: a cache of retrievals (a prompt is transformed once per
    tokenisation and once per generation) and counters not yet written to the handbook."""

    def __init__(self):
        self.cache: dict[tuple, list[Behavior]] = {}
        self.retrieved: Counter = Counter()
        self.last_eval: dict = {}

    def transform(self, section, prompt: str, example: Optional[dict]) -> Optional[str]:
        if example is not None and example.get("use_behaviors") is False:
            return None
        key = (prompt, str((example or {}).get(section.bci.topic_field)) if section.bci.retrieval == "topic" else None)
        if key not in self.cache:
            self.cache[key] = retrieve(section, shared_handbook(section), prompt, example)
        found = self.cache[key]
        if not found:
            return None
        self.retrieved.update(b.name for b in found)
        return render_block(section, found, prompt)

    def flush(self, section) -> None:
        if self.retrieved:
            shared_handbook(section).record_retrieved(dict(self.retrieved))
            self.retrieved.clear()

    def count_citations(self, section, samples: list[dict]) -> dict:
        """Citations of handbook behaviors in evaluated completions, into the handbook counters;
        returns per-eval metrics."""
        hb = shared_handbook(section)
        known = hb.names()
        cited, cited_ok = Counter(), Counter()
        citing = 0
        for s in samples:
            names = parse_citations(s.get("completion") or "", known)
            citing += bool(names)
            cited.update(names)
            if float(s.get("score", 0.0)) >= 1.0:
                cited_ok.update(names)
        hb.record_citations(dict(cited), dict(cited_ok))
        n = max(len(samples), 1)
        self.last_eval = {"eval/behaviors/citing_share": citing / n,
                          "eval/behaviors/citations_per_sample": sum(cited.values()) / n,
                          "eval/behaviors/distinct_cited": len(cited)}
        return self.last_eval


STATE = BCIState()
atexit.register(close_shared)  # the hooks' handbooks write their index when the process ends
