"""The causal-loop task (from the ZeroModel seed): integer programs of chained, merging and
looping assignments whose final value the model must compute.

Levels
------
Every value a problem computes stays in ``0..max_value`` (default 99); constants are ``1..9``
(``max_const``); start values are ``1..max_const``; operations are ``+``, ``-`` (subtraction),
``*`` and, in loops, ``%`` (modulus ``2..max_const``).

1. **Linear chain** of ``chain_length`` variables (default 4, i.e. 3 operations)::

       prompt      A=3;B=A+2;C=B*2;D=C-1;D=?
       completion  B=3+2=5;C=5*2=10;D=10-1=9;answer:9

   Each step ``X=Y op c`` is drawn uniformly from the (op, constant) pairs whose result stays
   in ``0..max_value`` given the value of ``Y``; so no step ever leaves the range and there is
   no rejection.

2. **Simple loop** of ``loop_ops`` operations (default 2) and a modulus, iterated until the
   value of ``A`` repeats (a fixed point or a cycle)::

       prompt      A=4;loop{B=A+2;C=B*2;A=C%5};A=?
       completion  B=4+2=6;C=6*2=12;A=12%5=2|B=2+2=4;C=4*2=8;A=8%5=3|B=3+2=5;C=5*2=10;A=10%5=0|B=0+2=2;C=2*2=4;A=4%5=4;answer:4

   Semantics: ``A_0`` is the start value; one *round* runs the loop body once and gives
   ``A_k``. Iteration stops after the first round ``k >= 1`` whose result ``A_k`` equals one of
   ``A_0 .. A_{k-1}`` (for a fixed point that is ``A_k == A_{k-1}``; otherwise a cycle has been
   entered). **The answer is that repeated value ``A_k``**; ``rounds`` is ``k``.
   Rounds are separated by ``|`` in the solution.

3. **Multi-path merge**: two roots, ``branch_ops`` operations on each branch (default 1), a
   merge of the two branch ends (``C+D``, ``C-D``, ``D-C`` or ``C*D``, drawn among those that stay
   in range) and ``tail_ops`` operations after the merge (default 1)::

       prompt      A=3;B=5;C=A*2;D=B+4;E=C+D;F=E-3;F=?
       completion  C=3*2=6;D=5+4=9;E=6+9=15;F=15-3=12;answer:12

4. **Nested loops of mutually dependent variables**: two state variables ``A`` and ``B``; the
   outer update of ``A`` reads ``B`` and the inner update of ``B`` reads the new ``A``::

       prompt      A=3;B=5;loop{C=A+B;A=C%7;D=A*3;B=D%4};B=?
       completion  C=3+5=8;A=8%7=1;D=1*3=3;B=3%4=3|C=1+3=4;A=4%7=4;D=4*3=12;B=12%4=0|C=4+0=4;A=4%7=4;D=4*3=12;B=12%4=0;answer:0

   The merge ``C=A?B`` is ``+``, ``*`` or ``-`` (``A-B``). The state is the pair ``(A, B)``;
   iteration stops after the first round whose state equals the start state or the state after
   an earlier round. **The answer is the value of the asked variable (``A`` or ``B``, drawn per
   problem) in that repeated state**; ``rounds`` is the number of rounds run.

Loop problems (levels 2 and 4) are drawn freely (ops, constants, moduli) and *resampled* when a
value along the actual computation leaves ``0..max_value`` or when the state does not repeat
within ``max_rounds`` rounds (default 6, which keeps level-2 texts under ~170 characters). After
``_FREE_ATTEMPTS`` rejected draws an example is drawn from a restricted family that always
satisfies both bounds (``+`` only, modulus ``<= max_rounds - 1``; after round 1 the state is a
function of a value below the modulus, so it repeats within ``modulus + 1`` rounds).

Answers and the answer parser
-----------------------------
The gold answer is an integer written in decimal (``"9"``). Every completion ends with
``answer:<int>``; with ``solution: false`` the completion is just ``answer:<int>``.
:func:`parse_answer` reads a model output: the **first** ``answer`` marker (case-insensitive,
followed by optional spaces, ``:`` or ``=``, optional spaces) decides; the integer right after it
(optional sign, ASCII digits) is the answer, and it must not continue as a decimal (``9.5``) or
run into more digits. No marker, or a marker not followed by such an integer, gives ``None``.
Leading zeros and ``+`` are normalised (``answer: 09`` -> ``"9"``). Scoring is exact match of
that integer with the gold answer (:func:`reward_exact_match`, :meth:`CausalLoopTask.score`).

Determinism, splits, examples
-----------------------------
Example ``i`` has level ``levels[i % len(levels)]`` and is a pure function of
``(params, seed, i)``: all randomness is drawn from a counter-based hash (splitmix64) of
``seed``, the level, ``i``, the attempt and the draw slot, so it does not depend on
``num_samples``, on chunking or on the process that generates it.

``split: train | validation | test | all`` (default ``all``) partitions the *problem space* by
a hash of the problem (not of the seed or index): a problem is in ``test`` when its hash falls
below ``test_fraction`` (default 0.1), in ``validation`` when it falls in the next
``val_fraction`` (default 0: no validation split), else in ``train``. Use ``split: train`` for
training, ``split: validation`` for choosing hyperparameters and ``split: test`` for the final
evaluation to get disjoint problem sets whatever the seeds (with ``val_fraction: 0``, ``train``
is everything outside ``test`` as before).

Each example is ``{"id": "causal_loop/<seed>/<i>", "prompt", "completion", "answer",
"group": "level_<L>", "level": L}`` plus ``"rounds"`` for levels 2 and 4. Examples are built on
access (the task keeps compact columns), so mutating a returned dict does not change the task.

Generation is vectorised with numpy across all samples of a level (draws, values and rounds are
array operations; texts are filled into one ``%``-template per level and round count), which is
what ``metareason bench data`` measures.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from metareason.data.base import Task, TaskError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OP_CHARS = ("+", "-", "*")
ADD, SUB, MUL = 0, 1, 2
LEVELS = (1, 2, 3, 4)
_FREE_ATTEMPTS = 24
_MAX_ATTEMPTS = 100_000

# ------------------------------------------------------------------------------------- params


@dataclass(frozen=True)
class CausalLoopConfig:
    levels: tuple[int, ...] = LEVELS
    solution: bool = True
    chain_length: int = 4
    loop_ops: int = 2
    branch_ops: int = 1
    tail_ops: int = 1
    max_rounds: int = 6
    max_value: int = 99
    max_const: int = 9
    split: str = "all"
    test_fraction: float = 0.1
    val_fraction: float = 0.0


_DEFAULTS = CausalLoopConfig()
_KNOWN = tuple(CausalLoopConfig.__dataclass_fields__)


def _int_param(params: dict, key: str, lo: int, hi: int) -> int:
    value = params.get(key, getattr(_DEFAULTS, key))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TaskError(f"params.{key}: expected an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise TaskError(f"params.{key}: {value} is out of range ({lo}-{hi})")
    return int(value)


def parse_levels(value: Any) -> tuple[int, ...]:
    """``[1, 2]``, ``"1,2"``, ``2`` -> ``(1, 2)``; unknown levels are a ``TaskError``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TaskError(f"params.levels: expected a list of levels (1-4), got {value!r}")
    if not items:
        raise TaskError("params.levels: no level given (choose from 1-4)")
    levels = []
    for item in items:
        try:
            level = int(item)
            if isinstance(item, bool) or (isinstance(item, float) and item != level):
                raise ValueError
        except (TypeError, ValueError):
            raise TaskError(f"params.levels: {item!r} is not a level (1-4)") from None
        if level not in LEVELS:
            raise TaskError(f"params.levels: level {level} does not exist (1-4)")
        if level not in levels:
            levels.append(level)
    return tuple(levels)


def parse_params(params: Optional[dict]) -> CausalLoopConfig:
    """Validate task params; every error names ``params.<key>``."""
    params = dict(params or {})
    params.pop("name", None)
    unknown = sorted(k for k in params if k not in _KNOWN)
    if unknown:
        raise TaskError(f"params.{unknown[0]}: unknown parameter (known: {', '.join(_KNOWN)})")
    solution = params.get("solution", True)
    if not isinstance(solution, bool):
        raise TaskError(f"params.solution: expected true or false, got {solution!r}")
    split = params.get("split", "all")
    if split not in ("all", "train", "validation", "test"):
        raise TaskError(f"params.split: expected all, train, validation or test, got {split!r}")
    frac = params.get("test_fraction", _DEFAULTS.test_fraction)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.01 <= frac <= 0.99:
        raise TaskError(f"params.test_fraction: expected a number in 0.01-0.99, got {frac!r}")
    val = params.get("val_fraction", _DEFAULTS.val_fraction)
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 0.98 - frac:
        raise TaskError(f"params.val_fraction: expected a number in 0-{0.98 - frac:.2f} "
                        f"(test_fraction + val_fraction < 0.99), got {val!r}")
    if split == "validation" and val == 0:
        raise TaskError("params.val_fraction: split validation needs val_fraction > 0")
    cfg = CausalLoopConfig(
        levels=parse_levels(params.get("levels", list(LEVELS))),
        solution=solution,
        chain_length=_int_param(params, "chain_length", 2, 26),
        loop_ops=_int_param(params, "loop_ops", 1, 8),
        branch_ops=_int_param(params, "branch_ops", 0, 8),
        tail_ops=_int_param(params, "tail_ops", 0, 8),
        max_rounds=_int_param(params, "max_rounds", 3, 30),
        max_value=_int_param(params, "max_value", 20, 999),
        max_const=_int_param(params, "max_const", 2, 9),
        split=split,
        test_fraction=float(frac),
        val_fraction=float(val),
    )
    if 2 + 2 * cfg.branch_ops + 1 + cfg.tail_ops > 26:
        raise TaskError("params.branch_ops: level 3 would need more than 26 variables")
    if cfg.loop_ops * cfg.max_const + cfg.max_const > cfg.max_value:
        raise TaskError(f"params.loop_ops: {cfg.loop_ops} additions of up to {cfg.max_const} "
                        f"may exceed max_value {cfg.max_value}")
    return cfg


# ------------------------------------------------------------------------------ random draws
_U = np.uint64
_M64 = (1 << 64) - 1
_GOLD = _U(0x9E3779B97F4A7C15)
_MIX1 = _U(0xBF58476D1CE4E5B9)
_MIX2 = _U(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = _U(30), _U(27), _U(31), _U(11)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of a uint64 array (wrapping arithmetic)."""
    z = x + _GOLD
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def _slot_key(slot: int) -> np.uint64:
    return _U(((slot + 1) * 0xD1B54A32D192ED03) & _M64)


class _Draws:
    """Independent uniform draws per sample: ``draw(slot, n)`` in ``[0, n)``."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys

    def bits(self, slot: int) -> np.ndarray:
        return _mix(self.keys ^ _slot_key(slot)) >> _S11  # 53 uniform bits

    def draw(self, slot: int, n) -> np.ndarray:
        n_u = n.astype(np.uint64) if isinstance(n, np.ndarray) else _U(n)
        return (self.bits(slot) % n_u).astype(np.int64)


def _hash_columns(level: int, cols: Sequence[np.ndarray]) -> np.ndarray:
    h = np.full(len(cols[0]), _U(level * 0x632BE59BD9B4E019 & _M64), dtype=np.uint64)
    for c in cols:
        h = _mix(h ^ np.asarray(c).astype(np.uint64))
    return h


# -------------------------------------------------------------------------------- arithmetic
def apply_op(op: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a op b`` for op codes 0 (+), 1 (-), 2 (*), array-wise."""
    return np.where(op == ADD, a + b, np.where(op == SUB, a - b, a * b))


def _pick_step(v: np.ndarray, bits: np.ndarray, max_value: int, k: int):
    """An (op, constant) pair uniform among those with ``v op c`` in ``0..max_value``.

    For each op the valid constants form a prefix ``1..count`` of ``1..k``, so the pair is the
    ``r``-th of ``count_add + count_sub + count_mul`` (always >= 1 since ``max_value >= k``).
    """
    n_add = np.clip(max_value - v, 0, k)
    n_sub = np.clip(v, 0, k)
    n_mul = np.where(v == 0, k, np.minimum(k, max_value // np.maximum(v, 1)))
    total = n_add + n_sub + n_mul
    r = (bits % total.astype(np.uint64)).astype(np.int64)
    op = np.where(r < n_add, ADD, np.where(r < n_add + n_sub, SUB, MUL))
    c = np.where(op == ADD, r, np.where(op == SUB, r - n_add, r - n_add - n_sub)) + 1
    return op, c, apply_op(op, v, c)


# ------------------------------------------------------------------------------ level models
# Each ``_sample_L(draws, cfg, safe)`` returns a dict of int arrays: "valid" (bool), "answer",
# "hash" (problem hash for the split), "rounds" (loops) and whatever the renderer needs.


def _sample_1(d: _Draws, cfg: CausalLoopConfig, safe: bool) -> dict:
    k, n_ops = cfg.max_const, cfg.chain_length - 1
    v0 = d.draw(0, k) + 1
    vals, ops, consts = [v0], [], []
    for s in range(n_ops):
        op, c, v = _pick_step(vals[-1], d.bits(1 + s), cfg.max_value, k)
        ops.append(op)
        consts.append(c)
        vals.append(v)
    return {"valid": np.ones(len(v0), bool), "answer": vals[-1], "vals": vals, "ops": ops,
            "consts": consts, "hash": _hash_columns(1, [v0, *ops, *consts])}


def _sample_3(d: _Draws, cfg: CausalLoopConfig, safe: bool) -> dict:
    k, mv = cfg.max_const, cfg.max_value
    a0, b0 = d.draw(0, k) + 1, d.draw(1, k) + 1
    slot = 2
    branches = []
    for root in (a0, b0):
        vals, ops, consts = [root], [], []
        for _ in range(cfg.branch_ops):
            op, c, v = _pick_step(vals[-1], d.bits(slot), mv, k)
            slot += 1
            ops.append(op)
            consts.append(c)
            vals.append(v)
        branches.append((vals, ops, consts))
    x, y = branches[0][0][-1], branches[1][0][-1]
    cand = np.stack([x + y, x - y, y - x, x * y], axis=1)  # merge kinds 0..3
    ok = (cand >= 0) & (cand <= mv)
    r = d.draw(slot, ok.sum(1))
    slot += 1
    merge = (np.cumsum(ok, axis=1) > r[:, None]).argmax(axis=1)
    m = cand[np.arange(len(x)), merge]
    tail_vals, tail_ops, tail_consts = [m], [], []
    for _ in range(cfg.tail_ops):
        op, c, v = _pick_step(tail_vals[-1], d.bits(slot), mv, k)
        slot += 1
        tail_ops.append(op)
        tail_consts.append(c)
        tail_vals.append(v)
    cols = [a0, b0, *branches[0][1], *branches[0][2], *branches[1][1], *branches[1][2], merge,
            *tail_ops, *tail_consts]
    return {"valid": np.ones(len(a0), bool), "answer": tail_vals[-1], "branches": branches,
            "merge": merge, "merge_val": m, "tail": (tail_vals, tail_ops, tail_consts),
            "hash": _hash_columns(3, cols)}


def _first_repeat(states: np.ndarray) -> np.ndarray:
    """Rounds ``k >= 1`` until ``states[:, k]`` equals an earlier state; 0 when none repeats."""
    n, r1 = states.shape
    rounds = np.zeros(n, np.int64)
    for k in range(1, r1):
        hit = (states[:, :k] == states[:, k:k + 1]).any(axis=1) & (rounds == 0)
        rounds[hit] = k
    return rounds


def _loop_valid(vals: np.ndarray, rounds: np.ndarray, max_value: int) -> np.ndarray:
    """All values computed in rounds ``< rounds`` lie in ``0..max_value``.

    ``vals``: ``[n, max_rounds, steps]``.
    """
    inside = ((vals >= 0) & (vals <= max_value)).all(axis=2)  # per round
    used = np.arange(vals.shape[1])[None, :] < rounds[:, None]
    return (rounds > 0) & (inside | ~used).all(axis=1)


def _sample_2(d: _Draws, cfg: CausalLoopConfig, safe: bool) -> dict:
    k, n_ops, rmax = cfg.max_const, cfg.loop_ops, cfg.max_rounds
    a0 = d.draw(0, k) + 1
    if safe:  # always valid: only additions, modulus <= max_rounds - 1
        ops = [np.zeros_like(a0) for _ in range(n_ops)]
        mod = d.draw(1, min(k, rmax - 1) - 1) + 2
    else:
        ops = [d.draw(2 + j, 3) for j in range(n_ops)]
        mod = d.draw(1, k - 1) + 2
    consts = [d.draw(2 + n_ops + j, k) + 1 for j in range(n_ops)]
    n = len(a0)
    vals = np.empty((n, rmax, n_ops + 1), np.int64)  # [:, r, 0] = A before round r+1
    states = np.empty((n, rmax + 1), np.int64)
    states[:, 0] = a = a0
    for r in range(rmax):
        vals[:, r, 0] = v = a
        for j in range(n_ops):
            v = apply_op(ops[j], v, consts[j])
            vals[:, r, j + 1] = v
        a = np.mod(v, mod)
        states[:, r + 1] = a
    rounds = _first_repeat(states)
    valid = _loop_valid(vals, rounds, cfg.max_value)
    answer = states[np.arange(n), rounds]
    return {"valid": valid, "answer": answer, "rounds": rounds, "ops": ops, "consts": consts,
            "mod": mod, "vals": vals, "states": states,
            "hash": _hash_columns(2, [a0, mod, *ops, *consts])}


def _sample_4(d: _Draws, cfg: CausalLoopConfig, safe: bool) -> dict:
    k, rmax = cfg.max_const, cfg.max_rounds
    a0, b0 = d.draw(0, k) + 1, d.draw(1, k) + 1
    if safe:  # always valid: additions only, m1 <= max_rounds - 1 (B is a function of A)
        mop, op = np.zeros_like(a0), np.zeros_like(a0)
        m1 = d.draw(2, min(k, rmax - 1) - 1) + 2
    else:
        mop, op = d.draw(4, 3), d.draw(5, 3)
        m1 = d.draw(2, k - 1) + 2
    m2 = d.draw(3, k - 1) + 2
    c = d.draw(6, k) + 1
    query = d.draw(7, 2)  # 0: A, 1: B
    n = len(a0)
    vals = np.empty((n, rmax, 6), np.int64)  # A, B, C, A', D, B' per round
    sa = np.empty((n, rmax + 1), np.int64)
    sb = np.empty((n, rmax + 1), np.int64)
    sa[:, 0], sb[:, 0] = a, b = a0, b0
    for r in range(rmax):
        cc = apply_op(mop, a, b)
        a2 = np.mod(cc, m1)
        dd = apply_op(op, a2, c)
        b2 = np.mod(dd, m2)
        vals[:, r] = np.stack([a, b, cc, a2, dd, b2], axis=1)
        a, b = a2, b2
        sa[:, r + 1], sb[:, r + 1] = a, b
    rounds = _first_repeat(sa * (cfg.max_value + 1) + sb)
    valid = _loop_valid(vals, rounds, cfg.max_value)
    idx = np.arange(n)
    answer = np.where(query == 0, sa[idx, rounds], sb[idx, rounds])
    return {"valid": valid, "answer": answer, "rounds": rounds, "mop": mop, "op": op, "c": c,
            "m1": m1, "m2": m2, "query": query, "vals": vals,
            "hash": _hash_columns(4, [a0, b0, mop, op, c, m1, m2, query])}


_SAMPLERS = {1: _sample_1, 2: _sample_2, 3: _sample_3, 4: _sample_4}


def _take(sample: Any, mask: np.ndarray) -> Any:
    if isinstance(sample, np.ndarray):
        return sample[mask]
    if isinstance(sample, dict):
        return {key: _take(v, mask) for key, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(_take(v, mask) for v in sample)
    return sample


def _put(dst: Any, src: Any, pos: np.ndarray) -> None:
    if isinstance(dst, np.ndarray):
        dst[pos] = src
    elif isinstance(dst, dict):
        for key in dst:
            _put(dst[key], src[key], pos)
    else:
        for a, b in zip(dst, src):
            _put(a, b, pos)


def _empty_like(sample: Any, n: int) -> Any:
    if isinstance(sample, np.ndarray):
        return np.empty((n,) + sample.shape[1:], sample.dtype)
    if isinstance(sample, dict):
        return {key: _empty_like(v, n) for key, v in sample.items()}
    return type(sample)(_empty_like(v, n) for v in sample)


def _in_split(h: np.ndarray, cfg: CausalLoopConfig) -> np.ndarray:
    if cfg.split == "all":
        return np.ones(len(h), bool)
    u = _mix(h ^ _U(0x5851F42D4C957F2D)) >> _S11  # uniform in [0, 2^53)
    test_end = _U(int(cfg.test_fraction * (1 << 53)))
    val_end = _U(int((cfg.test_fraction + cfg.val_fraction) * (1 << 53)))
    if cfg.split == "test":
        return u < test_end
    if cfg.split == "validation":
        return (u >= test_end) & (u < val_end)
    return u >= val_end


def sample_level(level: int, indices: np.ndarray, seed: int, cfg: CausalLoopConfig) -> dict:
    """Problem arrays for the examples at ``indices`` (all of level ``level``)."""
    n = len(indices)
    base = np.full(n, _U(seed & _M64), dtype=np.uint64)
    base = _mix(_mix(base) ^ _U(level)) ^ np.asarray(indices, dtype=np.int64).astype(np.uint64)
    base = _mix(base)
    sampler = _SAMPLERS[level]
    pending = np.arange(n)
    out = None
    attempt = 0
    while pending.size:
        if attempt >= _MAX_ATTEMPTS:  # pragma: no cover - needs a vanishing split
            raise TaskError(f"params.split: could not draw {cfg.split!r} problems for level {level}")
        keys = _mix(base[pending] ^ _U((attempt * 0x9FB21C651E98DF25) & _M64))
        s = sampler(_Draws(keys), cfg, attempt >= _FREE_ATTEMPTS)
        ok = s["valid"] & _in_split(s["hash"], cfg)
        if out is None:
            out = _empty_like(s, n)
        _put(out, _take(s, ok), pending[ok])
        pending = pending[~ok]
        attempt += 1
    assert out is not None
    return out


# ----------------------------------------------------------------------------------- render
_NUM = np.array([str(i) for i in range(1000)], dtype=object)
_OPS = np.array(OP_CHARS, dtype=object)
_MERGE_FMT = ("{x}+{y}", "{x}-{y}", "{y}-{x}", "{x}*{y}")


def _s(a: np.ndarray) -> list:
    return _NUM[a].tolist()


def _o(a: np.ndarray) -> list:
    return _OPS[a].tolist()


def _fill(template: str, cols: list[list]) -> list[str]:
    return [template % t for t in zip(*cols)]


def _render_1(s: dict, cfg: CausalLoopConfig):
    n_ops = cfg.chain_length - 1
    v = LETTERS
    prompt_t = f"{v[0]}=%s;" + "".join(f"{v[i + 1]}={v[i]}%s%s;" for i in range(n_ops)) + f"{v[n_ops]}=?"
    vals = [_s(x) for x in s["vals"]]
    ops = [_o(x) for x in s["ops"]]
    consts = [_s(x) for x in s["consts"]]
    pcols = [vals[0]]
    for i in range(n_ops):
        pcols += [ops[i], consts[i]]
    prompts = _fill(prompt_t, pcols)
    if not cfg.solution:
        return prompts, None
    comp_t = ";".join(f"{v[i + 1]}=%s%s%s=%s" for i in range(n_ops)) + ";answer:%s"
    ccols = []
    for i in range(n_ops):
        ccols += [vals[i], ops[i], consts[i], vals[i + 1]]
    ccols.append(vals[-1])
    return prompts, _fill(comp_t, ccols)


def _render_3(s: dict, cfg: CausalLoopConfig):
    nb, nt = cfg.branch_ops, cfg.tail_ops
    names = iter(LETTERS[2:])
    p_parts, c_parts, c_cols = ["A=%s;B=%s;"], [], []
    p_cols = [_s(s["branches"][0][0][0]), _s(s["branches"][1][0][0])]
    ends = []
    for b, root in enumerate("AB"):
        vals, ops, consts = s["branches"][b]
        prev = root
        for i in range(nb):
            name = next(names)
            sv, so, sc, sr = _s(vals[i]), _o(ops[i]), _s(consts[i]), _s(vals[i + 1])
            p_parts.append(f"{name}={prev}%s%s;")
            p_cols += [so, sc]
            c_parts.append(f"{name}=%s%s%s=%s;")
            c_cols += [sv, so, sc, sr]
            prev = name
        ends.append((prev, _s(vals[-1])))
    # merge: one template per merge kind keeps the variable order right
    merge_name = next(names)
    (xn, xs), (yn, ys) = ends
    tail_vals, tail_ops, tail_consts = s["tail"]
    t_parts, t_pcols, t_ccols = [], [], []
    prev = merge_name
    for i in range(nt):
        name = next(names)
        sv, so, sc, sr = _s(tail_vals[i]), _o(tail_ops[i]), _s(tail_consts[i]), _s(tail_vals[i + 1])
        t_parts.append((f"{name}={prev}%s%s;", f"{name}=%s%s%s=%s;"))
        t_pcols += [so, sc]
        t_ccols += [sv, so, sc, sr]
        prev = name
    merge = s["merge"]
    n = len(merge)
    prompts: list = [None] * n
    comps: list = [None] * n
    mval = _s(s["merge_val"])
    ans = _s(s["answer"])
    for kind in range(4):
        sel = np.flatnonzero(merge == kind)
        if not sel.size:
            continue
        sel_l = sel.tolist()

        def pick(cols):
            return [[col[i] for i in sel_l] for col in cols]

        m_expr = _MERGE_FMT[kind].format(x=xn, y=yn)
        prompt_t = "".join(p_parts) + f"{merge_name}={m_expr};" + "".join(t[0] for t in t_parts) + f"{prev}=?"
        ps = _fill(prompt_t, pick(p_cols + t_pcols))
        for i, text in zip(sel_l, ps):
            prompts[i] = text
        if cfg.solution:
            m_vals = _MERGE_FMT[kind].format(x="%s", y="%s") if kind != 2 else "%s-%s"
            m_cols = [ys, xs] if kind == 2 else [xs, ys]
            comp_t = ("".join(c_parts) + f"{merge_name}={m_vals}=%s;" + "".join(t[1] for t in t_parts)
                      + "answer:%s")
            cs = _fill(comp_t, pick(c_cols + m_cols + [mval] + t_ccols + [ans]))
            for i, text in zip(sel_l, cs):
                comps[i] = text
    return prompts, comps if cfg.solution else None


def _by_rounds(rounds: np.ndarray, build) -> list:
    """Fill texts group by group of equal round counts (one template per group)."""
    out: list = [None] * len(rounds)
    for k in np.unique(rounds).tolist():
        sel = np.flatnonzero(rounds == k)
        for i, text in zip(sel.tolist(), build(int(k), sel)):
            out[i] = text
    return out


def _render_2(s: dict, cfg: CausalLoopConfig):
    n_ops = cfg.loop_ops
    names = LETTERS[: n_ops + 1]
    body = ";".join(f"{names[j + 1]}={names[j]}%s%s" for j in range(n_ops))
    prompt_t = f"A=%s;loop{{{body};A={names[n_ops]}%%%s}};A=?"
    ops = [_OPS[x] for x in s["ops"]]  # object arrays, indexed per round-count group below
    consts = [_NUM[x] for x in s["consts"]]
    mods = _NUM[s["mod"]]
    pcols = [_s(s["states"][:, 0])]
    for j in range(n_ops):
        pcols += [ops[j].tolist(), consts[j].tolist()]
    prompts = _fill(prompt_t, pcols + [mods.tolist()])
    if not cfg.solution:
        return prompts, None
    round_t = ";".join(f"{names[j + 1]}=%s%s%s=%s" for j in range(n_ops)) + ";A=%s%%%s=%s"
    vals, states, ans = s["vals"], s["states"], s["answer"]

    def build(k: int, sel: np.ndarray):
        o = [x[sel].tolist() for x in ops]
        c = [x[sel].tolist() for x in consts]
        m = mods[sel].tolist()
        v = _NUM[vals[sel, :k]]  # [n, k, n_ops + 1] strings
        st = _NUM[states[sel, 1:k + 1]]
        cols = []
        for r in range(k):
            for j in range(n_ops):
                cols += [v[:, r, j].tolist(), o[j], c[j], v[:, r, j + 1].tolist()]
            cols += [v[:, r, n_ops].tolist(), m, st[:, r].tolist()]
        cols.append(_s(ans[sel]))
        return _fill("|".join([round_t] * k) + ";answer:%s", cols)

    return prompts, _by_rounds(s["rounds"], build)


def _render_4(s: dict, cfg: CausalLoopConfig):
    vals = s["vals"]
    mopc, opc = _OPS[s["mop"]], _OPS[s["op"]]
    c, m1, m2 = _NUM[s["c"]], _NUM[s["m1"]], _NUM[s["m2"]]
    qn = np.array(["A", "B"], dtype=object)[s["query"]].tolist()
    prompts = _fill("A=%s;B=%s;loop{C=A%sB;A=C%%%s;D=A%s%s;B=D%%%s};%s=?",
                    [_s(vals[:, 0, 0]), _s(vals[:, 0, 1]), mopc.tolist(), m1.tolist(), opc.tolist(),
                     c.tolist(), m2.tolist(), qn])
    if not cfg.solution:
        return prompts, None
    round_t = "C=%s%s%s=%s;A=%s%%%s=%s;D=%s%s%s=%s;B=%s%%%s=%s"
    ans = s["answer"]

    def build(k: int, sel: np.ndarray):
        mo, o, cc = mopc[sel].tolist(), opc[sel].tolist(), c[sel].tolist()
        a1, a2 = m1[sel].tolist(), m2[sel].tolist()
        sv = _NUM[vals[sel, :k]]  # [n, k, 6]: A, B, C, A', D, B'
        cols = []
        for r in range(k):
            v = [sv[:, r, j].tolist() for j in range(6)]
            cols += [v[0], mo, v[1], v[2], v[2], a1, v[3], v[3], o, cc, v[4], v[4], a2, v[5]]
        cols.append(_s(ans[sel]))
        return _fill("|".join([round_t] * k) + ";answer:%s", cols)

    return prompts, _by_rounds(s["rounds"], build)


_RENDERERS = {1: _render_1, 2: _render_2, 3: _render_3, 4: _render_4}


def generate_columns(cfg: CausalLoopConfig, seed: int, start: int, stop: int) -> dict:
    """Examples ``start..stop-1`` as columns: prompt, completion, answer (lists of str), level,
    rounds (int arrays; rounds is 0 for levels 1 and 3)."""
    n = max(0, stop - start)
    nlev = len(cfg.levels)
    prompts: list = [None] * n
    comps: list = [None] * n
    answers: list = [None] * n
    level_col = np.empty(n, np.int8)
    rounds_col = np.zeros(n, np.int16)
    for pos, level in enumerate(cfg.levels):
        first = (pos - start) % nlev  # first local offset whose global index has this level
        idx = np.arange(start + first, stop, nlev)
        if not idx.size:
            continue
        s = sample_level(level, idx, seed, cfg)
        p, c = _RENDERERS[level](s, cfg)
        a = _s(s["answer"])
        if c is None:
            c = ["answer:" + x for x in a]
        prompts[first::nlev] = p
        comps[first::nlev] = c
        answers[first::nlev] = a
        level_col[first::nlev] = level
        if "rounds" in s:
            rounds_col[first::nlev] = s["rounds"]
    return {"prompt": prompts, "completion": comps, "answer": answers, "level": level_col,
            "rounds": rounds_col}


# ------------------------------------------------------------------------------ answer parser
_MARKER = re.compile(r"answer\s*[:=]\s*", re.IGNORECASE)
_INT = re.compile(r"[+-]?[0-9]+(?![0-9]|\.[0-9])")


def parse_answer(text: Optional[str]) -> Optional[str]:
    """The integer after the first ``answer:`` marker, normalised (see the module docstring)."""
    if not text:
        return None
    marker = _MARKER.search(text)
    if marker is None:
        return None
    m = _INT.match(text, marker.end())
    if m is None:
        return None
    return str(int(m.group(0)))


def _gold(example: dict) -> Optional[int]:
    try:
        return int(str(example["answer"]).strip())
    except (KeyError, ValueError):
        return None


def reward_exact_match(completions: list[str], examples: list[dict]) -> list[float]:
    """1.0 where the parsed final integer equals the example's answer, else 0.0."""
    if len(completions) != len(examples):
        raise ValueError(f"reward_exact_match: {len(completions)} completions for {len(examples)} examples")
    out = []
    for text, ex in zip(completions, examples):
        pred = parse_answer(text)
        gold = _gold(ex)
        out.append(float(pred is not None and gold is not None and int(pred) == gold))
    return out


# ------------------------------------------------------------------------------------- task
def iter_examples(columns: dict, seed: int, start: int = 0):
    """Example dicts from :func:`generate_columns` output whose first index is ``start``."""
    rounds = columns["rounds"].tolist()
    for i, (p, c, a, level) in enumerate(zip(columns["prompt"], columns["completion"], columns["answer"],
                                             columns["level"].tolist())):
        ex = {"id": f"causal_loop/{seed}/{start + i}", "prompt": p, "completion": c, "answer": a,
              "group": f"level_{level}", "level": level}
        if level == 2 or level == 4:
            ex["rounds"] = rounds[i]
        yield ex


class CausalLoopTask(Task):
    """Examples ``0..num_samples-1`` of the causal-loop task, built on access from columns."""

    name = "causal_loop"

    def __init__(self, cfg: CausalLoopConfig, seed: int, num_samples: int):
        self.cfg = cfg
        self.seed = int(seed)
        self.columns = generate_columns(cfg, self.seed, 0, int(num_samples))

    @property
    def examples(self):  # type: ignore[override]
        return self

    def __len__(self) -> int:
        return len(self.columns["prompt"])

    def example(self, i: int) -> dict:
        col = self.columns
        level = int(col["level"][i])
        ex = {"id": f"causal_loop/{self.seed}/{i}", "prompt": col["prompt"][i],
              "completion": col["completion"][i], "answer": col["answer"][i],
              "group": f"level_{level}", "level": level}
        if level in (2, 4):
            ex["rounds"] = int(col["rounds"][i])
        return ex

    def __iter__(self):
        return iter_examples(self.columns, self.seed, 0)

    def groups(self) -> list[str]:
        return [f"level_{lv}" for lv in sorted({int(x) for x in np.unique(self.columns["level"])})]

    def extract_answer(self, completion: str) -> Optional[str]:
        return parse_answer(completion)

    def score(self, completion: str, example: dict) -> float:
        return reward_exact_match([completion], [example])[0]


def make_task(params: dict, seed: int, num_samples: int) -> CausalLoopTask:
    """Factory registered as ``causal_loop`` (see ``metareason.builtin``)."""
    cfg = parse_params(params)
    if int(num_samples) < 0:
        raise TaskError(f"num_samples: must be >= 0, got {num_samples}")
    return CausalLoopTask(cfg, seed, num_samples)
