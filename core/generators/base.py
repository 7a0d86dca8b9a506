"""The generator interface and its result type."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from metareason.errors import UserError

#: A prompt is text (completions) or chat messages ``[{"role": "user", "content": "..."}]``.
Prompt = Union[str, list[dict]]

#: OpenAI's finish reasons: "stop" (end of sequence or a stop string) or "length" (token budget).
FINISH_REASONS = ("stop", "length")


class GeneratorError(UserError):
    """A generator could not answer (bad configuration, an endpoint that refused, retries spent)."""


@dataclass
class Completion:
    text: str  # the completion, cut before the first stop string
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    prompt_index: int = 0  # which prompt of the call this answers
    sample_index: int = 0  # which of its n samples


def check_params(n: int, max_new_tokens: int, temperature: float, top_p: float,
                 stop: Optional[Sequence[str]]) -> list[str]:
    """Validate sampling arguments (``ValueError`` naming the argument); return ``stop`` as a list."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop: must be non-empty strings")
    return stops


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    best = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
    return (text, False) if best == -1 else (text[:best], True)


class Generator(ABC):
    """Answers prompts. ``generate`` returns ``len(prompts) * n`` completions, prompt-major
    (all samples of prompt 0, then prompt 1, ...). ``temperature == 0`` is greedy decoding."""

    name: str = "generator"

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> list[Completion]:
        ...

    def close(self) -> None:
        """Release clients, threads or models (idempotent)."""
