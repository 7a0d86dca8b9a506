"""Tasks of the plugin, both scored by the answer after ``The answer is:`` and carrying typed
gold steps (``cot_steps``) for the step analysis.

``memory_world``: a synthetic world of entities and numeric attributes, fixed by ``world_seed`` and
learned only through training data; two-hop questions (recall two facts, then add or subtract).
``split: train | heldout`` partitions the questions (not the facts): held-out questions combine
facts that training questions taught. ``kind: facts`` gives one-hop recall of every fact instead
(a "pretraining" corpus of the world).

``memory_reason_jsonl``: users' own labelled data (StrategyQA-style JSON Lines).
"""
from __future__ import annotations

import os
import random
from typing import Annotated, Literal, Optional

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from metareason.api import FieldName, Task, TaskError, TaskParams, load_records, parse_params
from metareason.plugins.memory_reason.steps import (answers_match, extract_answer, has_markers, normalise_steps,
                                                    parse_markers, plain_completion)
from metareason.plugins.memory_reason.world import PRETRAIN_PARTS, STRUCTURES, world_examples

NAMES = ("Ava", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Oz", "Pia",
         "Quin", "Rex", "Sue", "Tom")
ATTRIBUTES = ("pens", "cups", "keys", "hats")
OPS = ("sum", "diff")
KINDS = ("questions", "facts", "recall", "varied", "pretrain")


class StepTask(Task):
    """Examples with ``cot_steps``; the answer is what follows ``The answer is:``."""

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        return float(answers_match(self.extract_answer(completion), example["answer"]))


def build_world(entities: int, attributes: int, world_seed: int, max_value: int) -> dict[tuple[str, str], int]:
    """``(entity, attribute) -> value``: the facts, a pure function of the arguments."""
    rng = random.Random(f"memory_world/{world_seed}")
    return {(e, a): rng.randint(1, max_value) for e in NAMES[:entities] for a in ATTRIBUTES[:attributes]}


def _question(world, a: str, b: str, attr: str, op: str) -> dict:
    x, y = world[(a, attr)], world[(b, attr)]
    if op == "sum":
        q, expr, ans = f"How many {attr} do {a} and {b} have together?", f"{x}+{y}={x + y}", x + y
    else:
        q, expr, ans = f"How many more {attr} does {a} have than {b}?", f"{x}-{y}={x - y}", x - y
    steps = [{"type": "memory", "text": f"{a} has {x} {attr}."},
             {"type": "memory", "text": f"{b} has {y} {attr}."},
             {"type": "reason", "text": expr}]
    return {"id": f"memory_world/{op}/{attr}/{a}/{b}", "prompt": f"Q: {q}\n", "answer": str(ans), "group": op,
            "cot_steps": steps, "completion": plain_completion(steps, str(ans)),
            "facts": [{"entity": a, "attribute": attr, "value": x}, {"entity": b, "attribute": attr, "value": y}]}


def _fact(world, e: str, attr: str) -> dict:
    x = world[(e, attr)]
    steps = [{"type": "memory", "text": f"{e} has {x} {attr}."}]
    return {"id": f"memory_world/fact/{attr}/{e}", "prompt": f"Q: How many {attr} does {e} have?\n",
            "answer": str(x), "group": "fact", "cot_steps": steps, "completion": plain_completion(steps, str(x)),
            "facts": [{"entity": e, "attribute": attr, "value": x}]}


def _int_in(lo: int, hi: int):
    return Annotated[StrictInt, Field(ge=lo, le=hi)]




class WorldParams(TaskParams):
    """``params`` of ``memory_world``."""

    entities: _int_in(2, len(NAMES)) = 10
    attributes: _int_in(1, len(ATTRIBUTES)) = 2
    world_seed: _int_in(0, 2**31) = 0
    max_value: _int_in(1, 99) = 9
    ops: Annotated[list[Literal[OPS]], Field(min_length=1)] = list(OPS)
    split: Literal["train", "heldout", "val"] = "train"
    heldout_fraction: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.2
    kind: Literal[KINDS] = "questions"
    # kind: varied
    structures: Annotated[list[Literal[STRUCTURES]], Field(min_length=1)] = list(STRUCTURES)
    val_fraction: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.1
    # kind: pretrain, the weight of each part
    mix: dict[Literal[PRETRAIN_PARTS], Annotated[StrictFloat, Field(ge=0)]] = {"facts": 0.4, "arithmetic": 0.3, "multi": 0.3}

    @field_validator("mix")
    @classmethod
    def _some_weight(cls, value):
        if not value or not sum(value.values()):
            raise ValueError("at least one part needs a weight above 0")
        return value


def make_world_task(params: dict, seed: int, num_samples: int) -> StepTask:
    p = parse_params(WorldParams, params)
    n_ent, n_attr, world_seed, max_value = p.entities, p.attributes, p.world_seed, p.max_value
    ops, split, frac, kind = p.ops, p.split, p.heldout_fraction, p.kind
    params = p.model_dump()
    world = build_world(n_ent, n_attr, world_seed, max_value)
    names = NAMES[:n_ent]
    if kind in ("recall", "varied", "pretrain"):
        task = StepTask(world_examples(kind, params, world, names, ATTRIBUTES[:n_attr], max_value, world_seed, split,
                                       frac, seed, num_samples))
        task.name, task.world = "memory_world", world
        return task
    if split == "val":
        raise TaskError("params.split: val exists for kind: varied only")
    if kind == "facts":  # one-hop recall of every fact: a "pretraining" corpus of the world
        facts = [_fact(world, e, a) for e in names for a in ATTRIBUTES[:n_attr]]
        rng = random.Random(seed)
        task = StepTask([dict(facts[rng.randrange(len(facts))]) for _ in range(num_samples)])
        task.name, task.world = "memory_world", world
        return task
    keys = [(a, b, attr, op) for op in ops for attr in ATTRIBUTES[:n_attr] for a in names for b in names if a != b]
    random.Random(f"memory_world/split/{world_seed}").shuffle(keys)
    n_held = max(1, int(round(len(keys) * frac)))
    keys = keys[-n_held:] if split == "heldout" else keys[:-n_held]
    rng = random.Random(seed)
    order = list(range(len(keys)))
    rng.shuffle(order)
    if split == "train":  # as many as asked, cycling through the training questions
        order = [order[i % len(order)] for i in range(num_samples)]
    else:
        order = order[:num_samples]
    task = StepTask([_question(world, *keys[i]) for i in order])
    task.name = "memory_world"
    task.world = world
    return task


# ---------------------------------------------------------------------------------------------
class JsonlStepParams(TaskParams):
    """``params`` of ``memory_reason_jsonl``."""

    path: Annotated[StrictStr, Field(min_length=1)]  # a JSON Lines file
    question_field: FieldName = "question"
    answer_field: FieldName = "answer"
    steps_field: FieldName = "cot_steps"
    prompt_template: StrictStr = "Q: {question}\n"
    id_field: Optional[FieldName] = None
    group_field: Optional[FieldName] = None
    shuffle: StrictBool = True

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, value):
        if "{question}" not in value:
            raise ValueError("must contain {question}")
        return value


def make_jsonl_task(params: dict, seed: int, num_samples: int) -> StepTask:
    """Users' labelled data: one JSON object per line with a question, an answer and typed steps
    (``cot_steps: [{type, text}]`` or a string with ``[memory]:`` / ``[rag]:`` / ``[reason]:``)."""
    p = parse_params(JsonlStepParams, params)
    path = os.path.expanduser(p.path)
    qf, af, sf, template = p.question_field, p.answer_field, p.steps_field, p.prompt_template
    idf, gf, shuffle = p.id_field, p.group_field, p.shuffle
    records = load_records(path)
    if not records:
        raise TaskError(f"params.path: {path} holds no records")
    base = os.path.basename(path)
    examples = []
    for lineno, rec in records:
        where = f"{path}:{lineno}"
        for field in (qf, af, sf) + ((idf,) if idf else ()) + ((gf,) if gf else ()):
            if field not in rec:
                raise TaskError(f"{where}: missing field {field!r}; fields: {', '.join(sorted(rec)) or 'none'}")
        raw = rec[sf]
        if isinstance(raw, str):
            steps = parse_markers(raw, f"{where}: {sf}") if has_markers(raw) else None
            if steps is None:
                raise TaskError(f"{where}: {sf}: no step marker ([memory]:, [rag]: or [reason]:)")
        else:
            steps = normalise_steps(raw, f"{where}: {sf}")
        answer = str(rec[af]).strip()
        if isinstance(rec[af], bool):
            answer = "yes" if rec[af] else "no"  # StrategyQA stores true / false
        examples.append({"id": str(rec[idf]) if idf else f"{base}/{lineno}",
                         "prompt": template.replace("{question}", str(rec[qf])),
                         "answer": answer, "group": str(rec[gf]) if gf else "all",
                         "cot_steps": steps, "completion": plain_completion(steps, answer)})
    if shuffle:
        random.Random(seed).shuffle(examples)
    task = StepTask(examples[:num_samples])
    task.name = f"memory_reason_jsonl:{base}"
    return task
