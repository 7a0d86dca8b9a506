"""Tokenisation with label masks, and the SFT data stream.

Prompt tokens get label ``-100`` (out of the loss); completion tokens plus one EOS are learned.
Examples longer than ``max_length`` are truncated from the completion's end (counted, and the
count is reported). The stream's order is a function of (seed, epoch) only, so a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[list[int]]
    prompt_lengths: list[int]
    truncated: int


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) + the prompt's tokens; the same in training and generation."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_examples(tokenizer: Any, prompts: list[str], completions: list[str], max_length: int) -> Encoded:
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, plens, truncated = [], [], 0
    for p, c in zip(p_ids, c_ids):
        ids = bos + p + c + eos
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        out.append(ids)
        plens.append(min(len(bos) + len(p), len(ids)))
    return Encoded(out, plens, truncated)


def collate(rows: list[list[int]], prompt_lengths: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``labels`` (-100 on prompt and padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, plen) in enumerate(zip(rows, prompt_lengths)):
        t = torch.tensor(r, dtype=torch.long)
        ids[i, : len(r)] = t
        mask[i, : len(r)] = 1
        labels[i, plen: len(r)] = t[plen:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long)}


class SFTStream:
    """Batches of a fixed-size dataset, reshuffled each epoch by ``seed + epoch``.

    ``position`` counts examples consumed; it is saved in checkpoints and restored on resume.
    """

    def __init__(self, examples: list[dict], encoded: Encoded, batch_size: int, seed: int, pad_id: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.encoded = examples, encoded
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.position = 0
        self._order_epoch = -1
        self._order: Optional[torch.Tensor] = None

    def _order_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=g)
            self._order_epoch = epoch
        return self._order  # type: ignore[return-value]

    def next_batch(self) -> dict:
        n = len(self.examples)
        idx = []
        for _ in range(self.batch_size):
            epoch, offset = divmod(self.position, n)
            idx.append(int(self._order_for(epoch)[offset]))
            self.position += 1
        rows = [self.encoded.input_ids[i] for i in idx]
        batch = collate(rows, [self.encoded.prompt_lengths[i] for i in idx], self.pad_id)
        batch["examples"] = [self.examples[i] for i in idx]
        return batch

    @property
    def epoch(self) -> float:
        return self.position / len(self.examples)


def build_prompts(examples: list[dict], transform: Callable[[str, dict], str]) -> list[str]:
    return [transform(e["prompt"], e) for e in examples]
