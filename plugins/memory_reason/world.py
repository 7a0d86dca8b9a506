"""The varied-structure synthetic world (issue 29) behind ``memory_world`` kinds ``varied``,
``pretrain`` and ``recall``.

``varied``: questions of seven structures whose typed-step sequences differ (m = memory, r = reason),
so the type of the next step is not predictable from its position alone:

=============  ======  ==========================================================  ===========
structure      steps   question                                                    answer
=============  ======  ==========================================================  ===========
hop            m       How many pens does Ava have?                                3
plus           mr      How many pens would Ava have with 2 more?                   5
sum2           mmr     How many pens do Ava and Bo have together?                  7
diff           mmr     How many more pens does Bo have than Ava? (only if more)    1
compare        mmr     Who has more pens, Ava or Bo?                               Bo
sum2_plus      mmrr    How many pens would Ava and Bo have together with 2 more?   9
offset         rmr     What is 3+4 plus the number of pens Ava has?                10
sum3           mmmrr   How many pens do Ava, Bo and Cy have together?              9
compare_sum    mmrmr   Do Ava and Bo together have more pens than Cy?              yes / no
=============  ======  ==========================================================  ===========

At every position but the last (where only the answer line can come), more than one type occurs.
Each structure's questions are shuffled once by ``world_seed`` and split into ``heldout`` (last
``heldout_fraction``), ``val`` (the ``val_fraction`` before it) and ``train`` (the rest): disjoint
by construction. Training draws a structure uniformly, then the next question of that structure
(cycling); ``val`` / ``heldout`` take the structures round-robin, so each is represented.

``pretrain``: the base model's corpus, a mix (``mix``: weights of ``facts``, ``arithmetic``,
``multi``) of fact recall (every fact, "What do you know about Ava's pens?" -> "Ava has 3 pens."), the arithmetic the questions use (sums up to
three terms, differences, comparisons, written as the reason steps are) and sentences naming two
or three entities ("How many pens do Ava and Bo each have?" -> one memory line per entity).

``recall``: every fact exactly once, worded as in ``pretrain`` (the base's fact-recall check).
No prompt of ``pretrain`` or ``recall`` is the prompt of a ``varied`` question.
"""
from __future__ import annotations

import itertools
import math
import random
from collections import Counter

from metareason.api import TaskError
from metareason.plugins.memory_reason.steps import plain_completion

STRUCTURES = ("hop", "plus", "sum2", "diff", "compare", "sum2_plus", "offset", "sum3", "compare_sum")
TYPES = {"hop": "m", "plus": "mr", "sum2": "mmr", "diff": "mmr", "compare": "mmr", "sum2_plus": "mmrr", "offset": "rmr",
         "sum3": "mmmrr", "compare_sum": "mmrmr"}
PRETRAIN_PARTS = ("facts", "arithmetic", "multi")
_M, _R = "memory", "reason"


def _fact_step(world, e, attr):
    return {"type": _M, "text": f"{e} has {world[(e, attr)]} {attr}."}


def _cmp(x, y) -> str:
    return f"{x}>{y}" if x > y else f"{x}<{y}"


def keys(structure: str, world, names, attrs, max_value: int) -> list[tuple]:
    """Every question of a structure, in a fixed order."""
    v = world.__getitem__
    if structure == "hop":
        return [(e, a) for a in attrs for e in names]
    if structure == "plus":
        return [(e, p, a) for a in attrs for e in names for p in range(1, max_value + 1)]
    if structure == "sum2_plus":
        return [(x, y, p, a) for a in attrs for x, y in itertools.combinations(names, 2)
                for p in range(1, max_value + 1)]
    if structure == "sum2":
        return [(x, y, a) for a in attrs for x, y in itertools.combinations(names, 2)]
    if structure == "diff":
        return [(x, y, a) for a in attrs for x in names for y in names if v((x, a)) > v((y, a))]
    if structure == "compare":
        return [(x, y, a) for a in attrs for x in names for y in names if x != y and v((x, a)) != v((y, a))]
    if structure == "sum3":
        return [(x, y, z, a) for a in attrs for x, y, z in itertools.combinations(names, 3)]
    if structure == "compare_sum":
        return [(x, y, z, a) for a in attrs for x, y in itertools.combinations(names, 2) for z in names
                if z not in (x, y) and v((x, a)) + v((y, a)) != v((z, a))]
    if structure == "offset":
        return [(p, q, e, a) for a in attrs for e in names for p in range(1, max_value + 1)
                for q in range(1, max_value + 1)]
    raise TaskError(f"params.structures: unknown structure {structure!r} (known: {', '.join(STRUCTURES)})")


def question(structure: str, key: tuple, world) -> dict:
    """One question: prompt, typed gold steps, answer."""
    if structure == "hop":
        e, a = key
        q, steps, ans = f"How many {a} does {e} have?", [_fact_step(world, e, a)], world[(e, a)]
    elif structure == "plus":
        e, p, a = key
        x = world[(e, a)]
        q, ans = f"How many {a} would {e} have with {p} more?", x + p
        steps = [_fact_step(world, e, a), {"type": _R, "text": f"{x}+{p}={x + p}"}]
    elif structure == "sum2_plus":
        e1, e2, p, a = key
        x, y = world[(e1, a)], world[(e2, a)]
        q, ans = f"How many {a} would {e1} and {e2} have together with {p} more?", x + y + p
        steps = [_fact_step(world, e1, a), _fact_step(world, e2, a), {"type": _R, "text": f"{x}+{y}={x + y}"},
                 {"type": _R, "text": f"{x + y}+{p}={x + y + p}"}]
    elif structure in ("sum2", "diff", "compare"):
        e1, e2, a = key
        x, y = world[(e1, a)], world[(e2, a)]
        steps = [_fact_step(world, e1, a), _fact_step(world, e2, a)]
        if structure == "sum2":
            q, op, ans = f"How many {a} do {e1} and {e2} have together?", f"{x}+{y}={x + y}", x + y
        elif structure == "diff":
            q, op, ans = f"How many more {a} does {e1} have than {e2}?", f"{x}-{y}={x - y}", x - y
        else:
            q, op, ans = f"Who has more {a}, {e1} or {e2}?", _cmp(x, y), e1 if x > y else e2
        steps.append({"type": _R, "text": op})
    elif structure == "sum3":
        e1, e2, e3, a = key
        x, y, z = (world[(e, a)] for e in (e1, e2, e3))
        q, ans = f"How many {a} do {e1}, {e2} and {e3} have together?", x + y + z
        steps = [_fact_step(world, e, a) for e in (e1, e2, e3)] + [
            {"type": _R, "text": f"{x}+{y}={x + y}"}, {"type": _R, "text": f"{x + y}+{z}={x + y + z}"}]
    elif structure == "compare_sum":
        e1, e2, e3, a = key
        x, y, z = (world[(e, a)] for e in (e1, e2, e3))
        q, ans = f"Do {e1} and {e2} together have more {a} than {e3}?", "yes" if x + y > z else "no"
        steps = [_fact_step(world, e1, a), _fact_step(world, e2, a), {"type": _R, "text": f"{x}+{y}={x + y}"},
                 _fact_step(world, e3, a), {"type": _R, "text": _cmp(x + y, z)}]
    elif structure == "offset":
        p, r, e, a = key
        x = world[(e, a)]
        q, ans = f"What is {p}+{r} plus the number of {a} {e} has?", p + r + x
        steps = [{"type": _R, "text": f"{p}+{r}={p + r}"}, _fact_step(world, e, a),
                 {"type": _R, "text": f"{p + r}+{x}={p + r + x}"}]
    else:
        raise TaskError(f"params.structures: unknown structure {structure!r}")
    ans = str(ans)
    return {"id": "memory_world/" + "/".join([structure] + [str(k) for k in key]), "prompt": f"Q: {q}\n",
            "answer": ans, "group": structure, "structure": structure, "cot_steps": steps,
            "completion": plain_completion(steps, ans)}


def split_keys(structure, all_keys: list, world_seed: int, heldout_fraction: float, val_fraction: float) -> dict:
    """``{"train": [...], "val": [...], "heldout": [...]}``: disjoint, fixed by ``world_seed``."""
    ks = list(all_keys)
    random.Random(f"memory_world/varied/{world_seed}/{structure}").shuffle(ks)
    n_held = max(1, int(round(len(ks) * heldout_fraction)))
    n_val = int(round(len(ks) * val_fraction))
    if n_held + n_val >= len(ks):
        raise TaskError(f"params: structure {structure} has {len(ks)} questions, too few for heldout_fraction "
                        f"{heldout_fraction} and val_fraction {val_fraction} (use more entities)")
    return {"heldout": ks[len(ks) - n_held:], "val": ks[len(ks) - n_held - n_val: len(ks) - n_held],
            "train": ks[: len(ks) - n_held - n_val]}


def varied_examples(params, world, names, attrs, max_value, world_seed, split, frac, seed, num_samples) -> list:
    structures = params.get("structures", list(STRUCTURES))
    if not isinstance(structures, list) or not structures or any(s not in STRUCTURES for s in structures):
        raise TaskError(f"params.structures: expected a non-empty list of {', '.join(STRUCTURES)}, got {structures!r}")
    val_frac = params.get("val_fraction", 0.1)
    if not isinstance(val_frac, (int, float)) or not 0 <= val_frac < 1:
        raise TaskError(f"params.val_fraction: expected a number in [0, 1), got {val_frac!r}")
    if split == "val" and not val_frac:
        raise TaskError("params.split: val needs val_fraction > 0")
    pools = {s: split_keys(s, keys(s, world, names, attrs, max_value), world_seed, frac, val_frac)[split]
             for s in structures}
    rng = random.Random(seed)
    for s in structures:
        rng.shuffle(pools[s])
    out = []
    if split == "train":
        pos = {s: 0 for s in structures}
        for _ in range(num_samples):
            s = structures[rng.randrange(len(structures))]
            out.append(question(s, pools[s][pos[s] % len(pools[s])], world))
            pos[s] += 1
        return out
    for i in range(max(len(p) for p in pools.values())):  # round-robin: every structure represented
        for s in structures:
            if i < len(pools[s]) and len(out) < num_samples:
                out.append(question(s, pools[s][i], world))
    return out


# --------------------------------------------------------------------------------- base corpus
def fact_example(world, e, a) -> dict:
    """Worded unlike every question ("What do you know about Ava's pens?"), so the base corpus shares
    no prompt with the questions (the hop question is learned in fine-tuning)."""
    ex = question("hop", (e, a), world)
    ex.update(id=f"memory_world/fact/{a}/{e}", group="fact", structure="fact",
              prompt=f"Q: What do you know about {e}'s {a}?\n")
    return ex


def _example(ident, prompt, steps, answer, group) -> dict:
    return {"id": ident, "prompt": prompt, "answer": str(answer), "group": group, "structure": group,
            "cot_steps": steps, "completion": plain_completion(steps, str(answer))}


def arithmetic_examples(max_value: int) -> list:
    """Every operation the varied questions write in a reason step, as "Q: What is x+y?" ->
    "x+y=s": sums x+y with x up to 2*max_value (a first value or a partial sum) and y up to
    max_value (this covers every sum of every structure), differences x-y
    (max_value >= x > y), comparisons of x up to 2*max_value with y up to max_value ("x>y")."""
    out = []
    for x in range(1, 2 * max_value + 1):
        for y in range(1, max_value + 1):
            out.append(_example(f"memory_world/arith/sum/{x}/{y}", f"Q: What is {x}+{y}?\n",
                                [{"type": _R, "text": f"{x}+{y}={x + y}"}], x + y, "arithmetic"))
    for x in range(1, max_value + 1):
        for y in range(1, x):
            out.append(_example(f"memory_world/arith/diff/{x}/{y}", f"Q: What is {x}-{y}?\n",
                                [{"type": _R, "text": f"{x}-{y}={x - y}"}], x - y, "arithmetic"))
    for x in range(1, 2 * max_value + 1):
        for y in range(1, max_value + 1):
            if x != y:
                out.append(_example(f"memory_world/arith/cmp/{x}/{y}", f"Q: Is {x} more than {y}?\n",
                                    [{"type": _R, "text": _cmp(x, y)}], "yes" if x > y else "no", "arithmetic"))
    return out


def multi_example(world, ents, a) -> dict:
    who = " and ".join(ents) if len(ents) == 2 else f"{ents[0]}, {ents[1]} and {ents[2]}"
    steps = [_fact_step(world, e, a) for e in ents]
    return _example("memory_world/multi/" + "/".join((a,) + tuple(ents)), f"Q: How many {a} do {who} each have?\n",
                    steps, ", ".join(str(world[(e, a)]) for e in ents), "multi")


def pretrain_examples(params, world, names, attrs, max_value, seed, num_samples) -> list:
    mix = params.get("mix", {"facts": 0.4, "arithmetic": 0.3, "multi": 0.3})
    if (not isinstance(mix, dict) or not mix or any(k not in PRETRAIN_PARTS for k in mix)
            or any(not isinstance(w, (int, float)) or w < 0 for w in mix.values()) or not sum(mix.values())):
        raise TaskError(f"params.mix: expected weights of {', '.join(PRETRAIN_PARTS)} (>= 0, not all 0), got {mix!r}")
    rng = random.Random(seed)
    facts = [fact_example(world, e, a) for a in attrs for e in names]
    arith = arithmetic_examples(max_value)
    parts = {"facts": facts, "arithmetic": arith}
    order = {k: rng.sample(range(len(v)), len(v)) for k, v in parts.items()}  # every fact before a repeat
    pos = Counter()
    kinds = [k for k in PRETRAIN_PARTS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]
    out = []
    for _ in range(num_samples):
        k = rng.choices(kinds, weights)[0]
        if k == "multi":
            ents = rng.sample(list(names), rng.choice((2, 3)) if len(names) >= 3 else 2)
            out.append(multi_example(world, ents, rng.choice(list(attrs))))
            continue
        out.append(dict(parts[k][order[k][pos[k] % len(parts[k])]]))
        pos[k] += 1
    return out


def world_examples(kind, params, world, names, attrs, max_value, world_seed, split, frac, seed,
                   num_samples) -> list[dict]:
    """The examples of ``memory_world`` kinds recall, pretrain and varied."""
    if kind == "recall":
        facts = [fact_example(world, e, a) for a in attrs for e in names]
        if num_samples < len(facts):
            raise TaskError(f"num_samples: kind: recall checks every fact; the world has {len(facts)} facts, "
                            f"got num_samples {num_samples}")
        return facts
    if kind == "pretrain":
        return pretrain_examples(params, world, names, attrs, max_value, seed, num_samples)
    return varied_examples(params, world, names, attrs, max_value, world_seed, split, frac, seed, num_samples)


# --------------------------------------------------------------------------------- statistics
def type_sequence(example: dict) -> list[str]:
    """The gold step types followed by ``answer`` (the step after the last one)."""
    return [s["type"] for s in example["cot_steps"]] + ["answer"]


def position_entropy(examples: list[dict]) -> list[float]:
    """Entropy (bits) of the gold step type at each position, over examples long enough."""
    seqs = [type_sequence(e) for e in examples]
    out = []
    for i in range(max(len(s) for s in seqs)):
        counts = Counter(s[i] for s in seqs if i < len(s))
        n = sum(counts.values())
        out.append(-sum(c / n * math.log2(c / n) for c in counts.values()))
    return out


def position_baseline(examples: list[dict]) -> float:
    """Accuracy of guessing each step's type (answer included) by the most common type at its
    position: what a model that ignores the question gets. A type-token model must beat it."""
    seqs = [type_sequence(e) for e in examples]
    right = total = 0
    for i in range(max(len(s) for s in seqs)):
        counts = Counter(s[i] for s in seqs if i < len(s))
        right += max(counts.values())
        total += sum(counts.values())
    return right / total
