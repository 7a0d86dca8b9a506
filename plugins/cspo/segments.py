"""Control segments: ``<control>`` ... ``</control>``, on token ids and on text.

A *complete* control segment is an opening tag, the tokens after it, and the first closing tag
that follows. The rules (the same for :func:`control_mask` on ids and :func:`parse_segments` on
text):

* Segments do not nest: an opening tag inside an open segment is just content; the segment
  still ends at the first closing tag, and a closing tag after that is *stray*.
* A closing tag with no open segment before it is stray; it is not part of any segment.
* An opening tag that is never closed (``<control> ...`` to the end of the completion) starts an
  *unclosed* segment; it is **not** a complete segment: none of its tokens (the tag included)
  is marked, so CSPO does not train on a truncated control decision.
* Padding and other tokens outside segments are never marked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

CONTROL_OPEN = "<control>"
CONTROL_CLOSE = "</control>"
CONTROL_TOKENS = (CONTROL_OPEN, CONTROL_CLOSE)


def control_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Ids of ``<control>`` and ``</control>``; a ``ValueError`` when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in CONTROL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer has no {missing[0]!r} token: enable the cspo section (cspo.enabled: true) "
                         "so the control tokens are added to the vocabulary")
    return vocab[CONTROL_OPEN], vocab[CONTROL_CLOSE]


def control_mask_from_ids(input_ids: torch.Tensor, open_id: int, close_id: int,
                          pad_id: Optional[int] = None) -> torch.Tensor:
    """:func:`control_mask` with explicit tag ids (vectorised: cumulative sums, no token loop).

    The closing tags cut each row into regions (a closing tag belongs to the region it ends).
    A token is in a complete segment when an opening tag occurs at or before it in its region
    and its region is ended by a closing tag.
    """
    if input_ids.dim() == 1:
        return control_mask_from_ids(input_ids[None], open_id, close_id, pad_id)[0]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, length], got shape {tuple(input_ids.shape)}")
    is_open = input_ids == open_id
    is_close = input_ids == close_id
    opens = is_open.long().cumsum(-1)  # opening tags at or before t
    closes_incl = is_close.long().cumsum(-1)
    region = closes_incl - is_close.long()  # closing tags strictly before t
    # opening tags counted up to the last closing tag before t (0 in the first region)
    at_close = torch.where(is_close, opens, torch.zeros_like(opens))
    upto_prev_close = torch.cummax(at_close, dim=-1).values
    upto_prev_close = torch.cat([torch.zeros_like(upto_prev_close[:, :1]), upto_prev_close[:, :-1]], dim=-1)
    opened = opens > upto_prev_close
    ended = region < closes_incl[:, -1:]
    mask = opened & ended
    if pad_id is not None and pad_id not in (open_id, close_id):
        mask &= input_ids != pad_id
    return mask


def control_mask(input_ids: torch.Tensor, tokenizer: Any,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask of the tokens of complete control segments, tags included (see module docstring).

    ``input_ids`` is ``[B, T]`` (or ``[T]``); padding (the tokenizer's pad id, and positions
    where ``attention_mask`` is 0 when given) is never marked.
    """
    open_id, close_id = control_token_ids(tokenizer)
    mask = control_mask_from_ids(input_ids, open_id, close_id, getattr(tokenizer, "pad_token_id", None))
    if attention_mask is not None:
        mask &= attention_mask.bool()
    return mask


# ------------------------------------------------------------------------------------------ text
_TAG = re.compile(re.escape(CONTROL_OPEN) + "|" + re.escape(CONTROL_CLOSE))


@dataclass
class Segment:
    start: int  # offset of the opening tag
    end: int  # offset just after the closing tag
    content: str


@dataclass
class SegmentParse:
    segments: list[Segment] = field(default_factory=list)
    unclosed: Optional[int] = None  # offset of an opening tag never closed
    stray_closes: int = 0
    nested_opens: int = 0  # opening tags inside an open segment (content, by the rules)

    @property
    def well_formed(self) -> bool:
        return self.unclosed is None and not self.stray_closes and not self.nested_opens


def parse_segments(text: str) -> SegmentParse:
    """Complete segments of ``text`` and the ways it breaks the rules (module docstring)."""
    out = SegmentParse()
    start: Optional[int] = None
    for m in _TAG.finditer(text):
        if m.group(0) == CONTROL_OPEN:
            if start is None:
                start = m.start()
            else:
                out.nested_opens += 1
        elif start is None:
            out.stray_closes += 1
        else:
            out.segments.append(Segment(start, m.end(), text[start + len(CONTROL_OPEN): m.start()]))
            start = None
    out.unclosed = start
    return out


def strip_segments(text: str) -> str:
    """``text`` without its complete control segments (the reasoning the target wrote)."""
    parts, pos = [], 0
    for seg in parse_segments(text).segments:
        parts.append(text[pos: seg.start])
        pos = seg.end
    parts.append(text[pos:])
    return "".join(parts)
