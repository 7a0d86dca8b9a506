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

Params: ``split`` (train | test; disjoint numbers; the method format adds ``val``, a tenth of the
training numbers kept out of its train split), ``topics`` (default all six), ``format``,
``kind``.

**The method format (issue 28)**, ``format: method``. The format above (``short``, the default)
replaces a derivation by its citation, so "BC-SFT vs SFT" there is "no working vs working". In
the method format every step keeps its digit work and the two teachers differ only in how they
name the method:

* plain teacher (:func:`teacher_method`, no behavior in its prompt) restates the procedure's
  method before the digit work: ``rev 472: write the digits from the last one to the first one:
  2 7 4 -> 274.``
* BCI teacher (the same callable, the behaviors in its prompt's block) cites the behavior
  instead of the restatement and keeps the digit work: ``rev 472: behavior_rev: 2 7 4 -> 274.``

The question names its chain (``Q: fold 472: rev then dbl then dsum``), so a question of a chain
never trained on (:data:`HELDOUT_TOPICS`: new chains of the same four procedures) is solvable
by a model that knows the procedures. ``kind: pretrain`` gives long-hand single-procedure
examples (``Q: rev 472`` -> the restated method and the digit work) for a base that can already
do each procedure. :func:`bci_prompt` builds the behavior block in the order the chain applies
the procedures, or (``control=True``) a block of the same number of lines of unrelated behaviors
(:data:`CONTROL_BEHAVIORS`).
"""
from __future__ import annotations

import random
import re
from typing import Optional

from metareason.api import Task, TaskError

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
# new chains of the same procedures, never a training chain: the held-out topics of the BCI arm
HELDOUT_TOPICS = {
    "flip": ("dbl", "sort"),
    "spin": ("rev", "sort"),
    "churn": ("sort", "rev", "dbl"),
    "crest": ("dbl", "rev", "dsum"),
}
ALL_TOPICS = {**TOPICS, **HELDOUT_TOPICS}
# the restated method: what the plain teacher writes where the BCI teacher cites the behavior
METHODS = {
    "rev": "write the digits from the last one to the first one",
    "sort": "write the digits from the smallest one to the largest one",
    "dsum": "add the digits one at a time from the left keeping a running total",
    "dbl": "double each digit from the right and add the carry of the digit before",
}
# unrelated behaviors of the control block (no topic uses them; instructions of similar length)
CONTROL_BEHAVIORS = {
    "behavior_neg": "negate the number.",
    "behavior_inc": "add one to the number.",
    "behavior_rot": "rotate the digits left.",
    "behavior_half": "halve the number.",
}
FORMATS = ("short", "method")
# method format: the block in each question's prompt, and whose answer is the completion
BLOCKS = ("none", "ordered", "shuffled", "control", "mix")
ANSWERS = ("teacher", "plain", "cited")
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


# ------------------------------------------------------------------ the method format (issue 28)
def digit_work(op: str, n: int) -> str:
    """The digit work of one procedure (``2 7 4 -> 274``), the same in both teachers' answers."""
    return long_hand(op, n).split(": ", 1)[1][:-1]


def method_step(op: str, n: int, cite: bool) -> str:
    """One procedure of a chain: its method restated (plain) or its behavior cited (BCI); the
    digit work is kept either way."""
    head = behavior_name(op) if cite else METHODS[op]
    return f"{op} {n}: {head}: {digit_work(op, n)}."


def apply_chain(topic: str, n: int) -> int:
    for op in ALL_TOPICS[topic]:
        n = apply(op, n)
    return n


def solve_method(topic: str, n: int, known: frozenset = frozenset()) -> tuple[str, int]:
    """The method-format solution; procedures whose behavior name is in ``known`` are cited."""
    parts, x = [], n
    for op in ALL_TOPICS[topic]:
        parts.append(method_step(op, x, behavior_name(op) in known))
        x = apply(op, x)
    return " ".join(parts + [f"answer {x}"]), x


def method_question(topic: str, n: int) -> str:
    return f"Q: {topic} {n}: {' then '.join(ALL_TOPICS[topic])}\nA: "


def behavior_order(topic: str) -> list[str]:
    """The behaviors of a topic in the order its chain applies them (first use; no repeats)."""
    return [behavior_name(op) for op in dict.fromkeys(ALL_TOPICS[topic])]


def behavior_block(names: list[str], instructions: dict) -> str:
    """The kernel's default BCI block (behaviors.prompts.bci / behavior_line), lines in the given order."""
    from metareason.plugins.behaviors.config import BCI_BLOCK

    lines = "\n".join(f"- {name}: {instructions[name]}" for name in names)
    return BCI_BLOCK.replace("{behaviors}", lines)


def bci_prompt(topic: str, n: int, control: bool = False, keep: Optional[set] = None) -> str:
    """The question under a behavior block: the chain's behaviors in the order of application, or
    (``control``) as many unrelated behaviors (:data:`CONTROL_BEHAVIORS`), in a fixed order. With
    ``keep`` (a set of procedure names) only those behaviors stay; each other line is replaced, in
    place, by an unrelated behavior, so the block keeps its length and the model has to read it
    (the training mix of the BCI arm)."""
    names = behavior_order(topic)
    instructions = {**{behavior_name(op): PROCEDURES[op] for op in PROCEDURES}, **CONTROL_BEHAVIORS}
    fillers = iter(CONTROL_BEHAVIORS)
    if control:
        names = [next(fillers) for _ in names]
    elif keep is not None:
        names = [name if name[len("behavior_"):] in keep else next(fillers) for name in names]
    return behavior_block(names, instructions).replace("{question}", method_question(topic, n))


def shuffled_prompt(topic: str, n: int) -> str:
    """The ordered block's lines rotated by one (reversed for two behaviors, a derangement for
    three): the same content in an order other than the chain's."""
    names = behavior_order(topic)
    names = names[1:] + names[:1]
    instructions = {behavior_name(op): PROCEDURES[op] for op in PROCEDURES}
    return behavior_block(names, instructions).replace("{question}", method_question(topic, n))


def block_prompt(block: str, topic: str, n: int, rng: Optional[random.Random] = None) -> str:
    """The prompt of a question under one block condition (:data:`BLOCKS`). ``mix`` (the BCI arm's
    training mix) draws with ``rng``: a third question only, a third the ordered block, a third
    a partial block (a non-empty proper subset of the chain's behaviors kept, the others replaced
    by unrelated lines; a one-behavior chain gets the ordered block instead)."""
    if block == "none":
        return method_question(topic, n)
    if block == "ordered":
        return bci_prompt(topic, n)
    if block == "shuffled":
        return shuffled_prompt(topic, n)
    if block == "control":
        return bci_prompt(topic, n, control=True)
    if block == "mix":
        rng = rng or random.Random(0)
        pick = rng.randrange(3)
        ops = list(dict.fromkeys(ALL_TOPICS[topic]))
        if pick == 0:
            return method_question(topic, n)
        if pick == 1 or len(ops) < 2:
            return bci_prompt(topic, n)
        keep = set(rng.sample(ops, rng.randint(1, len(ops) - 1)))
        return bci_prompt(topic, n, keep=keep)
    raise ValueError(f"unknown block {block!r}")


def pretrain_example(op: str, n: int) -> dict:
    """A long-hand single-procedure example: the restated method and the digit work."""
    y = apply(op, n)
    return {"id": f"behavior_chain/pretrain/{op}/{n}", "prompt": f"Q: {op} {n}\nA: ",
            "completion": f"{method_step(op, n, False)} answer {y}", "answer": str(y), "group": op, "topic": op}


def _in_split(n: int, split: str) -> bool:
    return ((n * 2654435761) % 1000 < 800) == (split == "train")


def _in_val(n: int) -> bool:
    """A tenth of the training numbers, kept out of the method format's train split: the
    validation split that chooses every arm's learning rate."""
    return _in_split(n, "train") and (n * 40503) % 1000 < 100


def _numbers(split: str, fmt: str) -> list[int]:
    if fmt != "method":
        return [n for n in range(100, 1000) if _in_split(n, split)]
    if split == "val":
        return [n for n in range(100, 1000) if _in_val(n)]
    return [n for n in range(100, 1000) if _in_split(n, split) and not _in_val(n)]


class BehaviorChainTask(Task):
    name = "behavior_chain"

    def extract_answer(self, completion: str) -> Optional[str]:
        m = _ANSWER.search(completion.strip())
        return m.group(1) if m else None


def make_task(params: dict, seed: int, num_samples: int) -> BehaviorChainTask:
    params = dict(params or {})
    unknown = sorted(set(params) - {"split", "topics", "name", "format", "kind", "block", "answers"})
    if unknown:
        raise TaskError(f"params.{unknown[0]}: unknown parameter (known: split, topics, format, kind, block, answers)")
    fmt, kind = params.get("format", "short"), params.get("kind", "chain")
    if fmt not in FORMATS:
        raise TaskError(f"params.format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if kind not in ("chain", "pretrain"):
        raise TaskError(f"params.kind: expected chain or pretrain, got {kind!r}")
    if kind == "pretrain" and fmt != "method":
        raise TaskError("params.kind: pretrain examples exist in the method format only (params.format: method)")
    block, answers = params.get("block", "none"), params.get("answers", "teacher")
    if block not in BLOCKS:
        raise TaskError(f"params.block: expected one of {', '.join(BLOCKS)}, got {block!r}")
    if answers not in ANSWERS:
        raise TaskError(f"params.answers: expected one of {', '.join(ANSWERS)}, got {answers!r}")
    if (block != "none" or answers != "teacher") and (fmt != "method" or kind != "chain"):
        raise TaskError("params.block / params.answers: only for method-format chains (format: method, kind: chain)")
    split = params.get("split", "train")
    if split not in (("train", "val", "test") if fmt == "method" else ("train", "test")):
        raise TaskError(f"params.split: expected train or test (or val, in the method format), got {split!r}")
    known = ALL_TOPICS if fmt == "method" else TOPICS
    if kind == "pretrain":
        known = {op: (op,) for op in PROCEDURES}
    topics = params.get("topics", list(known if kind == "pretrain" else TOPICS))
    if not isinstance(topics, list) or not topics or any(t not in known for t in topics):
        raise TaskError(f"params.topics: expected a list of {', '.join(known)}, got {topics!r}")
    numbers = _numbers(split, fmt)
    pool = [(t, n) for t in topics for n in numbers]
    rng = random.Random(seed)
    rng.shuffle(pool)
    pool = pool[: min(num_samples, len(pool))] if num_samples else pool
    examples = []
    mix_rng = random.Random(f"mix/{seed}")
    for t, n in pool:
        if kind == "pretrain":
            examples.append(pretrain_example(t, n))
            continue
        if fmt == "method":
            prompt = block_prompt(block, t, n, mix_rng)
            if answers == "teacher":
                completion = teacher_method(prompt)
            else:
                completion = solve_method(t, n, frozenset(behavior_order(t)) if answers == "cited" else frozenset())[0]
            examples.append({"id": f"behavior_chain/{t}/{n}", "prompt": prompt, "completion": completion,
                             "answer": str(apply_chain(t, n)),
                             "group": t if block in ("none", "mix") else f"{block}/{t}", "topic": t,
                             "heldout": t in HELDOUT_TOPICS, "block": block})
            continue
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
    if topic not in ALL_TOPICS:
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


def teacher_method(prompt, **_) -> str:
    """The method-format teacher: plain (no behavior in the prompt) it restates each procedure's
    method before the digit work; under BCI it cites each behavior of its block instead of the
    restatement and keeps the digit work."""
    known = frozenset(re.findall(r"behavior_[a-z0-9_]+", prompt.split("Q: ")[0]))
    topic, n = _question(prompt)
    return solve_method(topic, n, known)[0]
