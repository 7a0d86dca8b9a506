"""The ``memory_reason:`` config section. Every hook of the plugin is a no-op unless ``enabled``."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from metareason.api import Section

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class MemoryReasonSection(Section):
    enabled: bool = False  # turns every hook on (tokens, data conversion, modes, eval analysis)
    step_tokens: bool = True  # false: plain CoT (no new tokens, steps as plain lines), analysis still on
    mode: Literal["full", "lora", "prompt-tuning", "lora+prompt-tuning"] = "full"  # lora modes need model.lora.enabled
    n_prefix: int = Field(2, ge=0)  # general prefix tokens <prefix_i> before every step
    n_special: int = Field(4, ge=1)  # tokens per step type: <memory_j> / <reason_j> / <answer_j>
    prefix_name: str = "prefix"
    memory_name: str = "memory"  # the paper's code calls memory steps "rag"
    reason_name: str = "reason"
    answer_name: str = "answer"
    init_words: dict[str, str] = {"memory": "memory", "reason": "reason", "answer": "answer"}
    # ^ the word whose embedding (mean of its pieces) starts each type's rows; a type not listed, and
    #   the prefix tokens, start at the vocabulary mean
    filler: bool = False  # control arm: every step gets n_special untyped <filler_j> tokens instead of its type's
    filler_name: str = "filler"
    first_prefix: Literal["prompt", "completion"] = "prompt"
    # ^ where the first step's prefix tokens go: the end of the prompt (the paper), or the start of the
    #   completion (chat templates: the prompt transform acts inside the user message, so "completion"
    #   keeps the prefix in the assistant reply; the model then writes it, in the loss)
    answer_prefix: str = "The answer is: "  # the answer line after its type tokens
    attention_samples: int = Field(16, ge=0)  # eval completions used for the attention heatmap (0: none)

    @field_validator("prefix_name", "memory_name", "reason_name", "answer_name", "filler_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be a plain name (letters, digits, _), e.g. memory")
        return v

    @field_validator("init_words")
    @classmethod
    def _known_types(cls, v: dict[str, str]) -> dict[str, str]:
        for key, word in v.items():
            if key not in ("memory", "reason", "answer"):
                raise ValueError(f"{key!r}: unknown step type (memory, reason, answer)")
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"{key!r}: must be a non-empty word")
        return v

    @model_validator(mode="after")
    def _distinct_names(self):
        names = [self.prefix_name, self.memory_name, self.reason_name, self.answer_name, self.filler_name]
        if len(set(names)) != len(names):
            raise ValueError("prefix_name, memory_name, reason_name, answer_name and filler_name must differ")
        if self.filler and not self.step_tokens:
            raise ValueError("filler replaces the step-type tokens by untyped ones; it needs step_tokens: true")
        if not self.step_tokens and self.mode in ("prompt-tuning", "lora+prompt-tuning"):
            raise ValueError(f"mode {self.mode!r} tunes the rows of the step tokens; it needs step_tokens: true")
        return self
