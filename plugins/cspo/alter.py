"""Alter models: who writes a control segment when the target is taken over.

* :class:`ProgrammaticAlter` (``alter_model_name: programmatic``) knows the solution of a
  causal-loop problem (the example's ``solution`` or ``completion``) and decides from the
  target's text so far: an arithmetic step that is not in the solution since the last control
  segment -> ``revise``; a complete correct computation anywhere in the text -> ``conclude``
  followed by ``answer:<gold>`` (with probability ``cspo.alter_conclude_prob``, else
  ``continue``); otherwise ``continue``.
* :class:`GeneratorAlter` (``alter_generator: NAME``) is any generator of the run config's
  ``generators:`` section (an OpenAI-compatible endpoint such as a 70B instruct model behind
  vLLM, a local model, a program): it reads ``cspo.alter_prompt`` filled with the problem and the
  reasoning so far and writes the segment's content up to ``</control>`` (greedy, at most
  ``cspo.alter_max_tokens`` tokens).
* :class:`HFAlter` (``alter_model_name: /path/to/model``) is the same with a local Hugging Face
  causal LM loaded in the alter's process (the kernel's ``local`` generator).

Both return the text appended at the trigger: ``<control>content</control>`` (without the
opening tag when the target already wrote it), plus the answer after a programmatic ``conclude``.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional

from metareason.api import UserError
from metareason.plugins.cspo.segments import CONTROL_CLOSE, CONTROL_OPEN, parse_segments, strip_segments

DECISIONS = ("continue", "conclude", "revise")
_STEP = re.compile(r"[A-Z]=-?\d+[-+*%]-?\d+=-?\d+")


@dataclass
class ControlRequest:
    """What the alter sees at a hand-over (plain data, so it crosses Ray actor boundaries)."""

    prompt: str
    text: str  # the target's completion so far, ending with the trigger
    trigger: str
    opened: bool  # the trigger was a TRIGGER_TOKEN: the target already wrote "<control>"
    example: Optional[dict] = None


def decision_of(content: str) -> str:
    """The control decision a segment's content names (first of continue/conclude/revise), else ``free``."""
    low = content.lower()
    found = [(low.find(d), d) for d in DECISIONS if d in low]
    return min(found)[1] if found else "free"


def causal_steps(text: str) -> list[str]:
    """Arithmetic steps ``X=a op b=r`` of a causal-loop text, in order."""
    return _STEP.findall(text)


def _segment(content: str, opened: bool) -> str:
    return ("" if opened else CONTROL_OPEN) + content + CONTROL_CLOSE


class ProgrammaticAlter:
    """The built-in alter for causal-loop tasks (see the module docstring).

    ``conclude_prob < 1`` models an alter that is not always sure: once the computation is
    complete and correct it concludes with that probability and otherwise asks to continue
    (verify again). The draw is a hash of the example id and the text so far, so a run is
    reproducible.
    """

    name = "programmatic"

    def __init__(self, conclude_prob: float = 1.0):
        self.conclude_prob = conclude_prob

    def decide(self, req: ControlRequest) -> str:
        gold = self._gold_steps(req.example)
        segs = parse_segments(req.text).segments
        since_last = req.text[segs[-1].end:] if segs else req.text
        known = set(gold)
        if any(step not in known for step in causal_steps(since_last)):
            return "revise"
        done = ";" + ";".join(gold) + ";"
        if done in ";" + ";".join(causal_steps(strip_segments(req.text))) + ";":
            return "conclude" if self._draw(req) < self.conclude_prob else "continue"
        return "continue"

    @staticmethod
    def _draw(req: ControlRequest) -> float:
        key = f"{(req.example or {}).get('id')}/{req.prompt}/{req.text}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2.0 ** 64

    def control(self, req: ControlRequest) -> str:
        decision = self.decide(req)
        text = _segment(decision, req.opened)
        if decision == "conclude":
            text += f"answer:{req.example['answer']}"
        return text

    @staticmethod
    def _gold_steps(example: Optional[dict]) -> list[str]:
        if not example or "answer" not in example:
            raise UserError("cspo.alter_model_name: programmatic: the alter needs each example's answer and "
                            "solution (a causal-loop task); use a local model path for other tasks")
        steps = causal_steps(str(example.get("solution") or example.get("completion") or ""))
        if not steps:
            raise UserError(f"cspo.alter_model_name: programmatic: example {example.get('id')!r} has no "
                            "causal-loop solution steps to check against")
        return steps


class GeneratorAlter:
    """A generator writes the control segment (see the module docstring)."""

    def __init__(self, generator: Any, prompt_template: str, max_tokens: int, name: str):
        self.generator, self.template, self.max_tokens, self.name = generator, prompt_template, max_tokens, name

    def prompt_for(self, req: ControlRequest) -> str:
        text = req.text
        if req.opened and text.endswith(req.trigger):  # the template opens the segment itself
            text = text[: -len(req.trigger)]
        # plain replacement: model text may contain braces, so no str.format
        return self.template.replace("{prompt}", req.prompt).replace("{text}", text)

    def control(self, req: ControlRequest) -> str:
        (gen,) = self.generator.generate([self.prompt_for(req)], max_new_tokens=self.max_tokens, temperature=0.0,
                                         stop=[CONTROL_CLOSE])
        content = gen.text.replace(CONTROL_OPEN, "").replace(CONTROL_CLOSE, "")
        return _segment(content, req.opened)


class HFAlter(GeneratorAlter):
    """Any local Hugging Face causal LM as the alter, through the kernel's ``local`` generator."""

    def __init__(self, path: str, prompt_template: str, max_tokens: int, device: str = "auto",
                 dtype: str = "float32", trust_remote_code: bool = False):
        from metareason.api import LocalGenerator, ModelConfig, build_model, load_tokenizer, resolve_device

        cfg = ModelConfig(path=path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            tokenizer = load_tokenizer(cfg)
            model = build_model(cfg, tokenizer, resolve_device(device))
        except UserError as exc:
            raise UserError(f"cspo.alter_model_name: {exc}") from None
        super().__init__(LocalGenerator(model, tokenizer, name=path), prompt_template, max_tokens, path)
        self.model, self.tokenizer = model, tokenizer


def build_alter(name: str, cfg: Any, device: str = "auto", dtype: str = "float32",
                generators: Optional[dict] = None, plugins: Optional[list] = None) -> Any:
    """The alter ``cspo.alter_generator`` or ``cspo.alter_model_name`` names; ``cfg`` is the
    ``cspo`` section, ``generators`` the run config's ``generators:`` section."""
    from metareason.plugins.cspo.config import PROGRAMMATIC

    if cfg.alter_generator:
        from metareason.api import Kernel

        kernel = Kernel({"plugins": plugins, "quiet": True, "generators": generators or {}})
        generator = kernel.generator(cfg.alter_generator)
        return GeneratorAlter(generator, cfg.alter_prompt, cfg.alter_max_tokens, cfg.alter_generator)
    if name == PROGRAMMATIC:
        return ProgrammaticAlter(cfg.alter_conclude_prob)
    return HFAlter(name, cfg.alter_prompt, cfg.alter_max_tokens, device=device, dtype=dtype)
