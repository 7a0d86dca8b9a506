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
from typing import Optional

from metareason.api import Task, TaskError
from metareason.plugins.memory_reason.steps import (answers_match, extract_answer, has_markers, normalise_steps,
                                                    parse_markers)

NAMES = ("Ava", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Oz", "Pia",
         "Quin", "Rex", "Sue", "Tom")
ATTRIBUTES = ("pens", "cups", "keys", "hats")
OPS = ("sum", "diff")
_WORLD_KEYS = ("entities", "attributes", "ops", "world_seed", "split", "heldout_fraction", "max_value", "kind",
               "structures", "val_fraction", "mix")
KINDS = ("questions", "facts", "recall", "varied", "pretrain")


class StepTask(Task):
    """Examples with ``cot_steps``; the answer is what follows ``The answer is:``."""

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        return float(answers_match(self.extract_answer(completion), example["answer"]))


def plain_completion(steps: list[dict], answer: str) -> str:
    return "\n".join([s["text"] for s in steps] + [f"The answer is: {answer}"])


def _int(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise TaskError(f"params.{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


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


def make_world_task(params: dict, seed: int, num_samples: int) -> StepTask:
    params = dict(params or {})
    unknown = sorted(k for k in params if k not in _WORLD_KEYS)
    if unknown:
        raise TaskError(f"params.{unknown[0]}: unknown parameter (known: {', '.join(_WORLD_KEYS)})")
    n_ent = _int(params, "entities", 10, 2, len(NAMES))
    n_attr = _int(params, "attributes", 2, 1, len(ATTRIBUTES))
    world_seed = _int(params, "world_seed", 0, 0, 2**31)
    max_value = _int(params, "max_value", 9, 1, 99)
    ops = params.get("ops", list(OPS))
    if not isinstance(ops, list) or not ops or any(o not in OPS for o in ops):
        raise TaskError(f"params.ops: expected a non-empty list of {', '.join(OPS)}, got {ops!r}")
    split = params.get("split", "train")
    if split not in ("train", "heldout", "val"):
        raise TaskError(f"params.split: expected train, val or heldout, got {split!r}")
    frac = params.get("heldout_fraction", 0.2)
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise TaskError(f"params.heldout_fraction: expected a number in (0, 1), got {frac!r}")

    kind = params.get("kind", "questions")
    if kind not in KINDS:
        raise TaskError(f"params.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    world = build_world(n_ent, n_attr, world_seed, max_value)
    names = NAMES[:n_ent]
    if kind in ("recall", "varied", "pretrain"):
        from metareason.plugins.memory_reason.world import make_task

        task = make_task(kind, params, world, names, ATTRIBUTES[:n_attr], max_value, world_seed, split, frac, seed,
                         num_samples)
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
_JSONL_KEYS = ("path", "question_field", "answer_field", "steps_field", "prompt_template", "id_field",
               "group_field", "shuffle")


def make_jsonl_task(params: dict, seed: int, num_samples: int) -> StepTask:
    """Users' labelled data: one JSON object per line with a question, an answer and typed steps
    (``cot_steps: [{type, text}]`` or a string with ``[memory]:`` / ``[rag]:`` / ``[reason]:``)."""
    from metareason.api import load_records

    params = dict(params or {})
    unknown = sorted(k for k in params if k not in _JSONL_KEYS)
    if unknown:
        raise TaskError(f"params.{unknown[0]}: unknown parameter (known: {', '.join(_JSONL_KEYS)})")
    path = params.get("path")
    if not isinstance(path, str) or not path:
        raise TaskError("params.path: required (a JSON Lines file)")
    path = os.path.expanduser(path)
    qf, af = params.get("question_field", "question"), params.get("answer_field", "answer")
    sf = params.get("steps_field", "cot_steps")
    template = params.get("prompt_template", "Q: {question}\n")
    if not isinstance(template, str) or "{question}" not in template:
        raise TaskError("params.prompt_template: must contain {question}")
    idf, gf = params.get("id_field"), params.get("group_field")
    shuffle = params.get("shuffle", True)
    if not isinstance(shuffle, bool):
        raise TaskError(f"params.shuffle: expected true or false, got {shuffle!r}")
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
