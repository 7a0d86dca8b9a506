"""The ``jsonl`` task: examples from a JSON Lines file.

Params::

    path: data/train.jsonl      # required; one JSON object per line (blank lines are skipped)
    question_field: question    # the prompt
    messages_field: null        # or: a conversation ([{role, content}, ...]; a final assistant
                                # message is the SFT target), instead of question_field
    answer_field: answer        # the gold answer (any JSON scalar; compared as stripped text)
    completion_field: null      # optional SFT target; defaults to the answer
    group_field: null           # optional per-group metrics (e.g. "difficulty"); default "all"
    id_field: null              # optional stable id; default "<file name>/<line number>"
    shuffle: true               # shuffle with the spec's seed before taking num_samples

Every other field of a record is kept in the example. ``num_samples`` caps the number of
examples (the first ones after the seeded shuffle). A line that is not a JSON object, or that
lacks a required field, is a ``TaskError`` naming the file and the line.

Scoring: the model's answer is the text after the last ``answer:`` marker when there is one
(``Answer: 42``), else the content of the last ``\\boxed{...}``, else the whole stripped completion;
it must equal the gold answer after stripping whitespace (numbers are compared as numbers when
both sides parse as numbers, so ``42.0`` matches ``42``).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Annotated, Any, Optional

from pydantic import Field, StrictBool, StrictStr, field_validator

from metareason.data.base import Task, TaskError, TaskParams, parse_params
from metareason.data.chat import ChatTemplateError, check_messages

FieldName = Annotated[StrictStr, Field(min_length=1)]  # the name of a field of the records


class JsonlParams(TaskParams):
    """``params`` of the ``jsonl`` task (see the module docstring)."""

    path: Annotated[StrictStr, Field(min_length=1)]  # a JSON Lines file
    question_field: Optional[FieldName] = None  # "question" unless messages_field is set
    messages_field: Optional[FieldName] = None
    answer_field: FieldName = "answer"
    completion_field: Optional[FieldName] = None
    group_field: Optional[FieldName] = None
    id_field: Optional[FieldName] = None
    shuffle: StrictBool = True
    name: Optional[StrictStr] = None  # set by a registration of a named jsonl task

    @field_validator("messages_field")
    @classmethod
    def _one_prompt_field(cls, value, info):
        if value is not None and info.data.get("question_field") is not None:
            raise ValueError("set either messages_field or question_field, not both")
        return value
_MARKER = re.compile(r"answer\s*[:=]", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(completion: str) -> Optional[str]:
    """The answer in a model completion (see the module docstring); ``None`` when empty."""
    if completion is None:
        return None
    text = completion
    markers = list(_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end():].strip()
        text = rest.splitlines()[0] if rest else ""
    else:
        boxed = _BOXED.findall(text)
        if boxed:
            text = boxed[-1]
    text = text.strip()
    return text or None


def _as_number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answers_match(predicted: Optional[str], gold: Any) -> bool:
    if predicted is None:
        return False
    gold_text = str(gold).strip()
    pred = predicted.strip()
    if pred == gold_text:
        return True
    a, b = _as_number(pred), _as_number(gold_text)
    return a is not None and b is not None and a == b


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class JsonlTask(Task):
    name = "jsonl"

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        return float(answers_match(self.extract_answer(completion), example["answer"]))


def load_records(path: str) -> list[tuple[int, dict]]:
    """``(line_number, record)`` for each non-blank line; errors name file and line."""
    if not os.path.isfile(path):
        raise TaskError(f"params.path: file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    return records


def make_task(params: dict, seed: int, num_samples: int) -> JsonlTask:
    """Factory registered as ``jsonl``."""
    p = parse_params(JsonlParams, params)
    path = os.path.expanduser(p.path)
    mf = p.messages_field
    qf = None if mf is not None else (p.question_field or "question")
    af, cf, gf, idf, shuffle = p.answer_field, p.completion_field, p.group_field, p.id_field, p.shuffle

    records = load_records(path)
    if not records:
        raise TaskError(f"params.path: {path} holds no records")
    base = os.path.basename(path)
    examples = []
    for lineno, rec in records:
        for field, role in ((qf, "question_field"), (mf, "messages_field"), (af, "answer_field"),
                            (cf, "completion_field"), (gf, "group_field"), (idf, "id_field")):
            if field is not None and field not in rec:
                raise TaskError(f"{path}:{lineno}: missing field {field!r} (params.{role}); "
                                f"fields: {', '.join(sorted(rec)) or 'none'}")
        ex = {k: v for k, v in rec.items() if k not in (qf, mf, af, cf, gf, idf)}
        answer = _text(rec[af]).strip()
        completion = _text(rec[cf]) if cf else answer
        if mf is not None:
            try:
                prompt: Any = check_messages(rec[mf], mf)
            except ChatTemplateError as exc:
                raise TaskError(f"{path}:{lineno}: {exc}") from None
            if prompt[-1]["role"] == "assistant":
                prompt, completion = prompt[:-1], prompt[-1]["content"] if not cf else completion
            if not prompt:
                raise TaskError(f"{path}:{lineno}: {mf}: no message before the assistant's reply")
        else:
            prompt = _text(rec[qf])
        ex.update(
            id=str(rec[idf]) if idf else f"{base}/{lineno}",
            prompt=prompt,
            completion=completion,
            answer=answer,
            group=str(rec[gf]) if gf else "all",
        )
        examples.append(ex)
    if shuffle:
        random.Random(seed).shuffle(examples)
    if num_samples is not None and int(num_samples) > 0:
        examples = examples[: int(num_samples)]
    task = JsonlTask(examples)
    task.name = f"jsonl:{base}"
    return task
