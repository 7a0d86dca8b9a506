"""The control reward, as three reward functions whose weights are set in ``rl.rewards``.

Each is registered under its own name so the RL loop logs each part (mean/std per step)::

    rl:
      rewards: {cspo_correct: 1.0, cspo_structure: 0.2, cspo_length: 0.5}

* ``cspo_correct``: 1 when the final answer (text outside control segments) equals the
  example's answer, else 0. Integers are read like the causal-loop task (first ``answer:``
  marker); other answers like the ``jsonl`` task.
* ``cspo_structure``: control-segment structure. 1 for at least one complete segment and no
  rule broken; 0 for no segment at all; -1 for an unclosed segment, a stray ``</control>``, a
  nested ``<control>`` or an empty segment.
* ``cspo_length``: a length penalty on the whole completion, ``-tokens / 100`` (tokens as the
  loop counted them; the weight sets the price of 100 tokens).
"""
from __future__ import annotations

from typing import Any, Optional

from metareason.plugins.cspo.segments import parse_segments, strip_segments

LENGTH_UNIT = 100.0


def _int(value: Any) -> Optional[int]:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def answer_correct(text: str, gold: Any) -> bool:
    from metareason.api import answers_match, extract_answer, parse_causal_loop_answer as parse_answer

    reasoning = strip_segments(text)
    gold_int = _int(gold)
    if gold_int is not None:
        pred = parse_answer(reasoning)
        return pred is not None and int(pred) == gold_int
    return answers_match(extract_answer(reasoning), gold)


def cspo_correct(completions: list[str], examples: list[dict]) -> list[float]:
    return [float(answer_correct(c, e.get("answer"))) for c, e in zip(completions, examples)]


def structure_score(text: str) -> float:
    parsed = parse_segments(text)
    if not parsed.well_formed or any(not s.content.strip() for s in parsed.segments):
        return -1.0
    return 1.0 if parsed.segments else 0.0


def cspo_structure(completions: list[str], examples: list[dict]) -> list[float]:
    return [structure_score(c) for c in completions]


def cspo_length(completions: list[str], examples: list[dict], completion_lengths: Optional[list[int]] = None,
                tokenizer: Any = None) -> list[float]:
    if completion_lengths is None:
        if tokenizer is not None:
            completion_lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
        else:
            completion_lengths = [len(c) for c in completions]
    return [-float(n) / LENGTH_UNIT for n in completion_lengths]


REWARDS = {"cspo_correct": cspo_correct, "cspo_structure": cspo_structure, "cspo_length": cspo_length}
