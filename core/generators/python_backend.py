"""``type: python``: a Python callable answers (programmatic teachers on synthetic tasks, tests).

The callable is ``fn(prompt, *, max_new_tokens, temperature, top_p, stop, seed, sample_index)``
and returns the completion text (or a :class:`Completion`). It is given in the config as
``function: package.module:attribute`` (imported, never evaluated), or passed directly:
``PythonGenerator(fn)``. The text is cut at the first stop string; token counts of plain text
are whitespace-separated words (there is no tokenizer).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

from pydantic import Field

from metareason.config import Section
from metareason.generators.base import Completion, Generator, GeneratorError, Prompt, check_params, cut_at_stop


class PythonGeneratorConfig(Section):
    type: str = "python"
    function: str = Field(..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:attribute


def import_function(spec: str, field: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise GeneratorError(f"{field}: cannot import {spec!r}: {exc}") from None
    if not callable(obj):
        raise GeneratorError(f"{field}: {spec!r} is not callable")
    return obj


def _words(text: str) -> int:
    return len(text.split())


class PythonGenerator(Generator):
    def __init__(self, fn: Callable[..., Any], name: str = "python"):
        self.fn, self.name = fn, name

    @classmethod
    def from_config(cls, cfg: PythonGeneratorConfig, name: str) -> "PythonGenerator":
        return cls(import_function(cfg.function, f"generators.{name}.function"), name=name)

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> list[Completion]:
        stops = check_params(n, max_new_tokens, temperature, top_p, stop)
        out = []
        for i, prompt in enumerate(prompts):
            prompt_text = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
            for j in range(n):
                got = self.fn(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop=stops, seed=seed, sample_index=j)
                if isinstance(got, Completion):
                    got.prompt_index, got.sample_index = i, j
                    out.append(got)
                    continue
                if not isinstance(got, str):
                    raise GeneratorError(f"generator {self.name!r}: the function returned {type(got).__name__}, not str")
                text, _ = cut_at_stop(got, stops)
                out.append(Completion(text, _words(prompt_text), _words(text), "stop", i, j))
        return out
