"""Hand-over from the target to the alter through the kernel's generation hooks.

:class:`HandoverController` is a plugin object registered on the target's kernel: it declares
the triggers (``TRIGGER_TOKENS`` and the ``TARGET_VALIDATION_KEYWORDS``, also capitalised) and,
in ``metareason_generation_handover``, decides whether to take over:

* a ``TRIGGER_TOKENS`` string (the target wrote ``<control>`` itself): always;
* a validation keyword: only when the target has written at least ``max_target_tokens`` tokens
  since the end of the last control segment (or the start); otherwise it returns ``None`` and
  the target just goes on.

When it takes over it asks the alter (a callable: in-process, or a Ray actor call) for the
control segment, which the kernel appends before the target resumes.

A segment whose decision is in ``cspo.hide_from_target`` (e.g. ``continue``) is written into
the transcript (:meth:`HandoverController.transcript`) but not shown to the target, which goes
on as if it had not been interrupted: for targets that cannot read inserted text (the demo's
tiny model re-checks by copying at a fixed relative offset, so ten inserted tokens derail it).
"""
from __future__ import annotations

from typing import Any, Callable

from metareason.api import hookimpl
from metareason.plugins.cspo.alter import ControlRequest, decision_of
from metareason.plugins.cspo.segments import parse_segments


def trigger_strings(cfg: Any) -> list[str]:
    """``TRIGGER_TOKENS`` then each keyword as written and capitalised (kernel matching is exact)."""
    out: list[str] = list(cfg.TRIGGER_TOKENS)
    for kw in cfg.TARGET_VALIDATION_KEYWORDS:
        for form in (kw, kw[:1].upper() + kw[1:]):
            if form not in out:
                out.append(form)
    return out


class HandoverController:
    def __init__(self, cfg: Any, tokenizer: Any, alter: Callable[[ControlRequest], str]):
        self.cfg, self.tokenizer, self.alter = cfg, tokenizer, alter
        self.triggers = trigger_strings(cfg)
        self.takeovers = 0
        self.declined = 0
        self.hidden: dict[int, list[tuple[int, str]]] = {}  # batch index -> (offset, segment) not shown

    def transcript(self, index: int, text: str) -> str:
        """``text`` with the segments kept from the target (``cspo.hide_from_target``) put back."""
        for offset, segment in reversed(self.hidden.get(index, [])):
            text = text[:offset] + segment + text[offset:]
        return text

    def tokens_since_control(self, text: str) -> int:
        segs = parse_segments(text).segments
        tail = text[segs[-1].end:] if segs else text
        return len(self.tokenizer(tail, add_special_tokens=False)["input_ids"])

    @hookimpl
    def metareason_generation_triggers(self):
        return self.triggers

    @hookimpl
    def metareason_generation_handover(self, state):
        opened = state.trigger in self.cfg.TRIGGER_TOKENS
        text = self.transcript(state.index, state.text)
        if not opened and self.tokens_since_control(text) < self.cfg.max_target_tokens:
            self.declined += 1
            return None
        self.takeovers += 1
        segment = self.alter(ControlRequest(state.prompt, text, state.trigger, opened, state.example))
        segs = parse_segments(segment).segments
        if (not opened and len(segs) == 1 and segs[0].end == len(segment)
                and decision_of(segs[0].content) in self.cfg.hide_from_target):
            # the transcript gets the segment, the target goes on as if it had not been interrupted
            self.hidden.setdefault(state.index, []).append((len(state.text), segment))
            return None
        return segment
