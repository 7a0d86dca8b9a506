"""Incremental detokenisation: the text each new token adds, in O(1) decodes per token.

Decoding a token alone loses what depends on its neighbours (a SentencePiece word's leading
space, a multi-byte character split over tokens), and decoding the whole completion per token is
O(L^2). As in vLLM, the text of a short window ``ids[prefix:]`` is compared with that of
``ids[prefix:read]``; the difference is the new text, held back while it ends in an incomplete
character (U+FFFD). Joined, the pieces are the completion's text as ``decode(ids)`` gives it for
tokenizers that decode piecewise; the server sends what is left of the full decode at the end.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def push(self, token: int) -> str:
        """Add a generated token; the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta
