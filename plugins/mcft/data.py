"""The ``mcft`` task: critique data from a CSV or JSON Lines file.

Columns / fields: ``prompt`` (the user question), ``cot`` (the model output being critiqued),
``critique``, ``reasoning``, ``answer`` and optional ``answer_match`` (``true``/``false``,
``1``/``0``, ``yes``/``no``; rows with false are dropped and counted), ``id``, ``gold`` (scored
against instead of ``answer``) and ``group``; other fields are kept in the example.

Params::

    path: data/critiques.jsonl   # .csv or .jsonl (.json lines)
    target: critique             # critique: the full MCFT format; answer: <ans>\\boxed{a}</ans> only;
                                 # solution: <think><reasoning>…</reasoning></think><ans>…</ans> (no critique)
    template: null               # prompt template with {system} {prompt} {cot} (default: the seed's)
    system: null                 # system instruction (default: the seed's)
    shuffle: true                # seeded shuffle before taking num_samples

A row that lacks a field, has an empty required field, or an ``answer_match`` that is not a
boolean is a ``TaskError`` naming the file and the row (CSV: line; JSONL: line).
"""
from __future__ import annotations

import csv
import os
import random
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, StrictBool, StrictStr, field_validator

from metareason.api import Task, TaskError, TaskParams, load_records, parse_params
from metareason.plugins.mcft.answers import extract_answer, is_correct
from metareason.plugins.mcft.format import (DEFAULT_TEMPLATE, SYSTEM_INSTRUCTION, build_answer_only,
                                            build_completion, build_prompt, build_solution_only)

REQUIRED = ("prompt", "cot", "critique", "reasoning", "answer")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise TaskError(f"{where}: answer_match: expected true or false, got {value!r}")


def read_rows(path: str) -> list[tuple[str, dict]]:
    """``(where, record)`` per row; ``where`` is ``file:line`` for error messages."""
    if not os.path.isfile(path):
        raise TaskError(f"params.path: file not found: {path}")
    rows: list[tuple[str, dict]] = []
    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise TaskError(f"{path}: missing column {missing[0]!r} (columns: "
                                f"{', '.join(reader.fieldnames or []) or 'none'})")
            for rec in reader:
                rows.append((f"{path}:{reader.line_num}", rec))
        return rows
    return [(f"{path}:{lineno}", rec) for lineno, rec in load_records(path)]


def load_critiques(path: str) -> tuple[list[dict], int]:
    """Valid rows (``answer_match`` true or absent) and the number dropped for ``answer_match`` false."""
    kept, dropped = [], 0
    base = os.path.basename(path)
    for where, rec in read_rows(path):
        if "answer_match" in rec and rec["answer_match"] not in (None, "") \
                and not _as_bool(rec["answer_match"], where):
            dropped += 1
            continue
        for name in REQUIRED:
            if name not in rec or rec[name] is None:
                raise TaskError(f"{where}: missing field {name!r}")
            if name in ("prompt", "answer") and not str(rec[name]).strip():
                raise TaskError(f"{where}: field {name!r} is empty")
        row = {k: (str(v) if k in REQUIRED else v) for k, v in rec.items()}  # other fields are kept
        row["id"] = str(rec.get("id") or f"{base}/{where.rsplit(':', 1)[-1]}")
        kept.append(row)
    return kept, dropped


class MCFTTask(Task):
    name = "mcft"

    def __init__(self, examples: list[dict], dropped: int):
        super().__init__(examples)
        self.dropped = dropped  # rows left out for answer_match false

    def example(self, i: int) -> dict:
        return dict(self.examples[i])

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        return float(is_correct(completion, example.get("gold", example["answer"])))


class MCFTParams(TaskParams):
    """``params`` of the ``mcft`` task (see the module docstring)."""

    path: Annotated[StrictStr, Field(min_length=1)]  # a .csv or .jsonl file of critiques
    target: Literal["critique", "answer", "solution"] = "critique"
    template: Optional[StrictStr] = None  # default (also when empty): the seed's
    system: Optional[StrictStr] = None  # default: the seed's
    shuffle: StrictBool = True
    name: Optional[StrictStr] = None  # set by a registration of a named task

    @field_validator("template")
    @classmethod
    def _has_prompt_and_cot(cls, value):
        for key in ("prompt", "cot"):
            if value and "{" + key + "}" not in value:
                raise ValueError(f"must contain {{{key}}}")
        return value


def make_task(params: dict, seed: int, num_samples: int) -> MCFTTask:
    p = parse_params(MCFTParams, params)
    path, target = p.path, p.target
    template = p.template or DEFAULT_TEMPLATE
    system = SYSTEM_INSTRUCTION if p.system is None else p.system
    rows, dropped = load_critiques(os.path.expanduser(path))
    if not rows:
        raise TaskError(f"params.path: {path} holds no usable rows ({dropped} dropped for answer_match false)")
    if p.shuffle:
        random.Random(seed).shuffle(rows)
    examples = []
    for r in rows[:num_samples]:
        try:
            prompt = build_prompt(template, system, r["prompt"], r["cot"])
        except (KeyError, IndexError, ValueError) as exc:
            raise TaskError(f"params.template: cannot be filled ({exc}); use {{system}} {{prompt}} {{cot}}") from None
        completion = (build_completion(r["critique"], r["reasoning"], r["answer"]) if target == "critique"
                      else build_solution_only(r["reasoning"], r["answer"]) if target == "solution"
                      else build_answer_only(r["answer"]))
        examples.append(dict(r, question=r["prompt"], prompt=prompt, completion=completion,
                             group=str(r.get("group") or "all")))
    return MCFTTask(examples, dropped)
