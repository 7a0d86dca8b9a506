"""The ``cspo:`` config section.

Every hook of the plugin is a no-op unless ``cspo.enabled`` is true. The alternating-control
keys keep the names of the MERA seed's inference config (``target_model_name`` ...,
``TRIGGER_TOKENS``, ``TARGET_VALIDATION_KEYWORDS``) so a seed config can be pasted in.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from metareason.api import Section

DEFAULT_VALIDATION_KEYWORDS = [
    "verify", "think again", "recap", "check", "wait", "alternatively", "hold on", "another", "yeah", "yes",
    "final answer", "confident",
]

DEFAULT_ALTER_PROMPT = (
    "You supervise a reasoning model. Read its reasoning so far and write one short control decision: "
    "continue, conclude (give the final answer), or revise.\n"
    "Problem: {prompt}\nReasoning so far: {text}\nControl: <control>"
)

PROGRAMMATIC = "programmatic"


class CSPOSection(Section):
    enabled: bool = False  # adds <control>/</control> to the vocabulary and turns the hooks on
    mask_rl_loss: bool = True  # CSPO: the RL token loss only on complete control segments

    # --- alternating control / takeover (the seed's keys) ---------------------------------
    target_model_name: Optional[str] = None  # local HF dir or run dir; default: the run's model
    alter_model_name: str = PROGRAMMATIC  # "programmatic" (causal-loop tasks) or a local HF dir
    alter_generator: Optional[str] = None  # a `generators:` entry writes the segments (overrides alter_model_name)
    target_model_gpu: int = Field(0, ge=0)  # GPUs of the target's Ray actor (0 when none exist)
    alter_model_gpu: int = Field(0, ge=0)
    max_target_tokens: int = Field(64, ge=0)  # target tokens since the last control before a takeover
    TRIGGER_TOKENS: list[str] = ["<control>"]  # the target asks for control: always handed over
    TARGET_VALIDATION_KEYWORDS: list[str] = list(DEFAULT_VALIDATION_KEYWORDS)

    # --- how the hand-over runs -------------------------------------------------------------
    ray: bool = True  # target and alter each in their own Ray actor (False: one process)
    max_handovers: int = Field(16, gt=0)  # trigger rounds per sequence
    alter_max_tokens: int = Field(48, gt=0)  # budget of an HF / generator alter's control segment
    alter_prompt: str = DEFAULT_ALTER_PROMPT  # HF / generator alter; {prompt} and {text} are filled in
    alter_conclude_prob: float = Field(1.0, ge=0.0, le=1.0)  # programmatic alter: conclude when done, with this p
    hide_from_target: list[Literal["continue", "revise"]] = []  # decisions written to the transcript only
    output: Optional[str] = None  # takeover / infer output JSONL (default: runs/<name>/...)
    keep_incorrect: bool = False  # takeover: keep records whose final answer is wrong

    @field_validator("TRIGGER_TOKENS", "TARGET_VALIDATION_KEYWORDS")
    @classmethod
    def _non_empty_strings(cls, v: list[str]) -> list[str]:
        if any(not isinstance(s, str) or not s for s in v):
            raise ValueError("must be a list of non-empty strings")
        return v

    @field_validator("alter_prompt")
    @classmethod
    def _has_placeholders(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain {text} (the target's reasoning so far)")
        return v
