"""The ``mcft:`` config section. Every hook of the plugin is a no-op unless ``mcft.enabled``."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, PrivateAttr, field_validator

from metareason.api import Section
from metareason.plugins.mcft.format import DEFAULT_TEACHER_PROMPT


class MCFTSection(Section):
    enabled: bool = False  # adds the eight format tags to the vocabulary and turns the hooks on
    threshold: float = Field(0.2, ge=0.0, le=1.0)  # P(a label token inside <think> is dropped from the loss)
    mask_offset: int = Field(0, ge=0)  # the first mask_offset tokens after <think> are never dropped
    bf_beta: float = Field(0.05, ge=0.0)  # weight of the format term 1 - mean p(tag) (0: no term)
    entropy_threshold: float = Field(0.8, ge=0.0)  # eval: mean token entropy (nats) above which a completion is flagged

    # --- metareason mcft critiques ---------------------------------------------------------
    base_generator: Optional[str] = None  # `generators:` entry whose attempts are critiqued
    teacher_generator: Optional[str] = None  # `generators:` entry that writes critique + reasoning + answer
    teacher_prompt: str = DEFAULT_TEACHER_PROMPT  # {prompt} and {cot} are filled in
    attempts: int = Field(1, gt=0)  # base attempts per question
    base_max_tokens: int = Field(256, gt=0)
    base_temperature: float = Field(1.0, ge=0.0)
    # set: the base generator gets chat messages [system, user question] (rendered in its model's
    # chat template) instead of the bare question string -- a real instruct model's own attempts
    base_system_prompt: Optional[str] = None
    teacher_max_tokens: int = Field(512, gt=0)
    output: Optional[str] = None  # critiques JSONL (default: runs/<name>/critiques-<split>.jsonl)

    # the token ids of the eight tags in this run's tokenizer, set when the kernel prepares the model
    # (the loss hook has no tokenizer); kept on the run's config, not in module state
    _tag_ids: Optional[list[int]] = PrivateAttr(default=None)

    @property
    def tag_ids(self) -> Optional[list[int]]:
        return self._tag_ids

    def set_tag_ids(self, ids: list[int]) -> None:
        self._tag_ids = list(ids)

    @field_validator("teacher_prompt")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        for key in ("{prompt}", "{cot}"):
            if key not in v:
                raise ValueError(f"must contain {key}")
        return v
