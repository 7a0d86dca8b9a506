"""The MCFT output format and its pieces.

    <think><critique>…</critique><reasoning>…</reasoning></think><ans>\\boxed{…}</ans>

The eight tags are special tokens (one token each) when ``mcft.enabled``. The default prompt
template carries the seed's system instruction, the user prompt and the model output being
critiqued (``cot``).
"""
from __future__ import annotations

import re
from typing import Optional

THINK, THINK_END = "<think>", "</think>"
CRITIQUE, CRITIQUE_END = "<critique>", "</critique>"
REASONING, REASONING_END = "<reasoning>", "</reasoning>"
ANS, ANS_END = "<ans>", "</ans>"
TAGS = (THINK, THINK_END, CRITIQUE, CRITIQUE_END, REASONING, REASONING_END, ANS, ANS_END)

SYSTEM_INSTRUCTION = (
    "You are given with user prompt and language model output. "
    "Your task is to first critique the language model output and then use the useful reasoning chains "
    "in language model output to generate the final answer. Before generating answer think step by step "
    "to give your reasoning."
)
DEFAULT_TEMPLATE = "{system}\n\nUser prompt:\n{prompt}\n\nLanguage model output:\n{cot}\n\n"

DEFAULT_TEACHER_PROMPT = (
    "Critique the language model output below: point to its first wrong step (or say that every step is "
    "correct), then give a correct step-by-step solution and the final answer. Reply exactly as "
    "<critique>...</critique><reasoning>...</reasoning><ans>\\boxed{{answer}}</ans>\n"
    "Problem: {prompt}\nAttempt: {cot}\n"
)

# The well-formed completion: every section non-empty, in order, nothing after </ans>.
_FORMAT = re.compile(
    r"\s*<think>\s*<critique>(?P<critique>[\s\S]+?)</critique>\s*"
    r"<reasoning>(?P<reasoning>[\s\S]+?)</reasoning>\s*</think>\s*"
    r"<ans>\s*\\boxed\{(?P<boxed>[\s\S]+)\}\s*</ans>\s*"
)


def build_prompt(template: str, system: str, prompt: str, cot: str) -> str:
    return template.format(system=system, prompt=prompt, cot=cot)


def build_completion(critique: str, reasoning: str, answer: str) -> str:
    return (f"{THINK}{CRITIQUE}{critique}{CRITIQUE_END}{REASONING}{reasoning}{REASONING_END}{THINK_END}"
            f"{ANS}\\boxed{{{answer}}}{ANS_END}")


def build_solution_only(reasoning: str, answer: str) -> str:
    """The target of the "SFT on the correct solution" baseline (issue 30): the teacher's solution
    and answer in the format, without the critique."""
    return f"{THINK}{REASONING}{reasoning}{REASONING_END}{THINK_END}{ANS}\\boxed{{{answer}}}{ANS_END}"


def build_answer_only(answer: str) -> str:
    """The target of the "SFT on answers alone" baseline: the answer part of the format."""
    return f"{ANS}\\boxed{{{answer}}}{ANS_END}"


def is_well_formed(text: Optional[str]) -> bool:
    """The whole completion follows the format (braces inside ``\\boxed{}`` balanced)."""
    if text is None:
        return False
    m = _FORMAT.fullmatch(text)
    return m is not None and _balanced(m.group("boxed"))


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def format_reward(completions: list[str], examples: Optional[list[dict]] = None) -> list[float]:
    """1.0 for a well-formed completion, else 0.0 (registered as the reward ``mcft_format``)."""
    return [float(is_well_formed(c)) for c in completions]


def section(text: str, open_tag: str, close_tag: str) -> Optional[str]:
    """The text between the first ``open_tag`` and the next ``close_tag`` (``None`` if absent)."""
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    return None if end < 0 else text[start + len(open_tag): end].strip()
