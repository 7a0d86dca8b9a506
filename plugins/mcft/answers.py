"""Answer extraction and equivalence.

Extraction: the content of the last ``\\boxed{...}`` (nested braces matched), else the text after
"The answer is", "Final answer" or "Answer:" (first match in that order of patterns, to the end
of its line, trailing period removed), else ``None``.

Equivalence: ``math-verify`` (fractions, LaTeX, units, symbolic forms) on both sides wrapped in
``$...$`` (bare text as a second try); when it cannot parse either side or raises, a normalised
exact match (whitespace, ``$``, a trailing period and surrounding ``\\text{}`` removed).
"""
from __future__ import annotations

import re
from typing import Any, Optional

_FALLBACKS = (
    re.compile(r"the answer is\s*:?\s*([^\n]+)", re.IGNORECASE),
    re.compile(r"final answer\s*:?\s*([^\n]+)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE),
)


def boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` in ``text``, braces matched."""
    out = []
    start = text.find("\\boxed{")
    while start >= 0:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text) and depth:
            depth += (text[j] == "{") - (text[j] == "}")
            j += 1
        if depth == 0:
            out.append(text[i: j - 1])
        start = text.find("\\boxed{", j if depth == 0 else i)
    return out


def extract_answer(text: Optional[str]) -> Optional[str]:
    if not text:
        return None
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip() or None
    for pattern in _FALLBACKS:
        m = pattern.search(text)
        if m:
            value = m.group(1).strip().rstrip(".").strip()
            return value or None
    return None


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip().rstrip(".")
    m = re.fullmatch(r"\\text\{(.*)\}", s)
    if m:
        s = m.group(1)
    return re.sub(r"\s+", "", s)


def _parse(x: str):
    from math_verify import parse

    got = parse(f"${x}$")
    return got if got else parse(x)


def answers_equivalent(predicted: Optional[str], gold: Any) -> bool:
    if predicted is None or gold is None:
        return False
    gold_text = str(gold)
    if _normalise(predicted) == _normalise(gold_text):
        return True
    try:
        from math_verify import verify

        g, p = _parse(gold_text), _parse(predicted)
        if g and p:
            return bool(verify(g, p))
    except Exception:  # math-verify's parser/timeouts: fall back to the exact match above
        pass
    return False


def is_correct(completion: Optional[str], gold: Any) -> bool:
    return answers_equivalent(extract_answer(completion), gold)


def correct_reward(completions: list[str], examples: list[dict]) -> list[float]:
    """1.0 when the extracted answer is equivalent to ``example["answer"]`` (reward ``mcft_correct``)."""
    return [float(is_correct(c, e.get("answer"))) for c, e in zip(completions, examples)]
