"""Programmatic teacher and a noisy base solver for the causal-loop task (demo generators).

Both are ``python`` generator callables (``generators: {teacher: {type: python, function:
metareason.plugins.mcft.teacher:causal_loop_teacher}}``). The teacher reads ``Problem:`` and
``Attempt:`` lines of its prompt (the default ``mcft.teacher_prompt``), re-computes the program
step by step, and points to the first step of the attempt that differs from the correct one:

    <critique>Step 2 C=5*2=11 is wrong: it should be C=5*2=10.</critique>
    <reasoning>B=3+2=5;C=5*2=10;D=10-1=9</reasoning><ans>\\boxed{9}</ans>

The noisy solver stands in for a weak base model: it solves the program and, with probability
``ERROR_RATE`` (a stable hash of prompt, sample index and seed decides), adds a small error to
one step's result and carries it forward, so its final answer is then usually wrong.
Programs are parsed (never evaluated as Python): ``X=Y op Z`` with ``+ - * %``, constants, and
one ``loop{...}`` iterated until the state of the variables set before the loop repeats.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

ERROR_RATE = 0.5
MAX_ROUNDS = 12
_ASSIGN = re.compile(r"([A-Z])=([A-Z]|\d+)([+\-*%])([A-Z]|\d+)$")
_CONST = re.compile(r"([A-Z])=(\d+)$")
_STEP = re.compile(r"([A-Z])=(\d+)([+\-*%])(\d+)=(-?\d+)$")


@dataclass(frozen=True)
class Step:
    var: str
    a: int
    op: str
    b: int
    value: int

    def text(self) -> str:
        return f"{self.var}={self.a}{self.op}{self.b}={self.value}"


class ProgramError(ValueError):
    pass


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ProgramError("modulus by zero")
    return a % b


def parse_program(problem: str):
    """``(initial {var: value}, pre-loop assignments, loop assignments, asked variable)``."""
    text = problem.strip().replace(" ", "")
    m = re.fullmatch(r"(.*?);([A-Z])=\?", text)
    if not m:
        raise ProgramError(f"not a causal-loop program: {problem!r}")
    body, asked = m.group(1), m.group(2)
    loop: list[tuple] = []
    lm = re.search(r"loop\{(.*)\}", body)
    if lm:
        loop = [_assignment(s) for s in lm.group(1).split(";") if s]
        body = body[: lm.start()].rstrip(";")
    initial, pre = {}, []
    for stmt in (s for s in body.split(";") if s):
        c = _CONST.fullmatch(stmt)
        if c:
            initial[c.group(1)] = int(c.group(2))
        else:
            pre.append(_assignment(stmt))
    return initial, pre, loop, asked


def _assignment(stmt: str) -> tuple:
    m = _ASSIGN.fullmatch(stmt)
    if not m:
        raise ProgramError(f"cannot read the statement {stmt!r}")
    return m.groups()


def _value(env: dict, x: str) -> int:
    if x.isdigit():
        return int(x)
    if x not in env:
        raise ProgramError(f"variable {x} is used before it is set")
    return env[x]


def solve(problem: str, error_at: Optional[int] = None, delta: int = 1) -> tuple[list[list[Step]], int]:
    """Rounds of steps and the answer; ``error_at`` adds ``delta`` to that step's result (noisy)."""
    initial, pre, loop, asked = parse_program(problem)
    env = dict(initial)
    rounds: list[list[Step]] = []
    count = 0

    def run(stmts) -> list[Step]:
        nonlocal count
        out = []
        for var, x, op, y in stmts:
            a, b = _value(env, x), _value(env, y)
            v = _apply(op, a, b)
            if error_at is not None and count == error_at:
                v = max(0, v + delta)
            env[var] = v
            out.append(Step(var, a, op, b, v))
            count += 1
        return out

    if pre:
        rounds.append(run(pre))
    if loop:
        state_vars = sorted(initial)
        seen = [tuple(env[v] for v in state_vars)]
        first = run(loop)
        rounds = [rounds[0] + first] if rounds else [first]
        for _ in range(MAX_ROUNDS):
            state = tuple(env[v] for v in state_vars)
            if state in seen:
                break
            seen.append(state)
            rounds.append(run(loop))
    return rounds, _value(env, asked)


def solution_text(rounds: list[list[Step]]) -> str:
    return "|".join(";".join(s.text() for s in r) for r in rounds)


def parse_attempt(text: str) -> tuple[list[str], Optional[str]]:
    """The attempt's step texts (rounds flattened) and its ``answer:`` value."""
    answer = None
    m = re.search(r"answer\s*[:=]\s*(-?\d+)", text, re.IGNORECASE)
    if m:
        answer = str(int(m.group(1)))
        text = text[: m.start()]
    steps = [s.strip() for s in re.split(r"[;|\n]", text) if s.strip()]
    return steps, answer


def critique(problem: str, attempt: str) -> tuple[str, str, int]:
    """``(critique, reasoning, answer)`` for an attempt at ``problem``."""
    rounds, answer = solve(problem)
    ref = [s.text() for r in rounds for s in r]
    steps, claimed = parse_attempt(attempt)
    for i, want in enumerate(ref):
        if i >= len(steps):
            text = f"The attempt stops after step {i}; step {i + 1} should be {want}."
            break
        got = steps[i].replace(" ", "")
        if got != want:
            text = f"Step {i + 1} {got} is wrong: it should be {want}."
            break
    else:
        if claimed != str(answer):
            text = f"Every step is correct, but the final answer {claimed} is wrong: it is {answer}."
        else:
            text = "Every step is correct."
    return text, solution_text(rounds), answer


def _field(prompt: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.*)$", prompt, re.MULTILINE)
    if not m:
        raise ProgramError(f"the teacher prompt has no '{name}:' line")
    return m.group(1).strip()


def causal_loop_teacher(prompt, **_) -> str:
    """Generator callable: the critique, the correct solution and the answer in the MCFT format."""
    text, reasoning, answer = critique(_field(prompt, "Problem"), _field(prompt, "Attempt"))
    return f"<critique>{text}</critique><reasoning>{reasoning}</reasoning><ans>\\boxed{{{answer}}}</ans>"


def _draw(*parts) -> int:
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def noisy_solver(prompt, *, seed=None, sample_index=0, **_) -> str:
    """Generator callable: a causal-loop solution with one wrong step ``ERROR_RATE`` of the time."""
    problem = prompt.strip()
    clean, _answer = solve(problem)
    n_steps = sum(len(r) for r in clean)
    h = _draw(problem, sample_index, seed)
    error_at = None
    delta = 1
    if (h % 10_000) / 10_000 < ERROR_RATE and n_steps:
        error_at = (h >> 16) % n_steps
        delta = ((h >> 32) % 3 + 1) * (1 if (h >> 40) % 2 else -1)
    try:
        rounds, answer = solve(problem, error_at, delta)
    except ProgramError:  # an error that breaks the program (modulus by zero): keep the clean one
        rounds, answer = clean, _answer
    return f"{solution_text(rounds)};answer:{answer}"


# ------------------------------------------------------------------ reasoning-gym arithmetic
# an equation of the attempt: a chain ``a op b [op c ...] = r`` (not starting inside a number)
_EQUATION = re.compile(r"(?<!\d)(?<!\d\.)((?:-?\d+\s*[+\-*×]\s*)+-?\d+)\s*=\s*(-?\d+)(?!\d|\.\d)")


def _arith_value(expr: str) -> tuple[int, list[str]]:
    """Value of an integer expression of + - * (and parentheses) with its left-to-right steps
    (``a op b = c``) when it has only + and -; a parser over ``ast``, never ``eval``."""
    import ast

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise ProgramError(f"unsupported expression: {expr!r}")

    value = ev(ast.parse(expr.replace("×", "*"), mode="eval"))
    toks = re.findall(r"\d+|[+\-*()×]", expr)
    steps = []
    plain = (toks and not any(t in "*()×" for t in toks) and len(toks) % 2 == 1
             and all(t.isdigit() for t in toks[::2]) and all(not t.isdigit() for t in toks[1::2]))
    if plain:
        acc = int(toks[0])
        for op, num in zip(toks[1::2], toks[2::2]):
            new = acc + int(num) if op == "+" else acc - int(num)
            steps.append(f"{acc} {op} {num} = {new}")
            acc = new
    return value, steps or [f"{expr} = {value}"]


def arithmetic_critique(question: str, attempt: str) -> tuple[str, str, int]:
    """``(critique, reasoning, answer)`` for a reasoning-gym ``basic_arithmetic`` question
    ("Calculate 5 - 33 - 65.") and a free-text attempt: the first equation ``a op b ... = c`` of the
    attempt whose result is wrong, else the attempt's final answer (``\\boxed{}``, "the answer
    is", or its last integer) right or wrong, or that it gives none."""
    from metareason.plugins.mcft.answers import extract_answer

    m = re.search(r"Calculate\s+(.+?)\.?\s*$", question.strip(), re.DOTALL)
    if not m:
        raise ProgramError(f"not an arithmetic question: {question!r}")
    value, steps = _arith_value(m.group(1))
    for lhs, c in _EQUATION.findall(attempt):
        lhs = " ".join(lhs.split())
        true = _arith_value(lhs)[0]
        if int(c) != true:
            crit = f"The step {lhs} = {c} is wrong: {lhs} = {true}."
            break
    else:
        got = extract_answer(attempt)
        nums = re.findall(r"-?\d+(?:\.\d+)?", got if got is not None else attempt)
        if not nums:
            crit = "The attempt gives no final answer."
        elif float(nums[-1]) == value:
            crit = f"The final answer {nums[-1]} is correct."
        else:
            crit = f"The final answer {nums[-1]} is wrong: it should be {value}."
    return crit, "; ".join(steps) + ".", value


def arithmetic_teacher(prompt, **_) -> str:
    """Generator callable for reasoning-gym arithmetic: reads ``Problem:`` (one line) and
    everything after ``Attempt:`` (the attempt may span lines) of the default teacher prompt."""
    question = _field(prompt, "Problem")
    m = re.search(r"^Attempt:[ \t]*(.*)\Z", prompt, re.MULTILINE | re.DOTALL)
    if not m:
        raise ProgramError("the teacher prompt has no 'Attempt:' line")
    text, reasoning, answer = arithmetic_critique(question, m.group(1))
    return f"<critique>{text}</critique><reasoning>{reasoning}</reasoning><ans>\\boxed{{{answer}}}</ans>"
