"""Tokenisation with label masks, and the SFT data stream.

Prompt tokens get label ``-100`` (out of the loss); completion tokens plus one EOS are learned.
Examples longer than ``max_length`` are truncated from the completion's end (counted, and the
count is reported). The stream's order is a function of (seed, epoch) only, so a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metareason.data.chat import needs_bos

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[list[int]]
    prompt_lengths: list[int]
    truncated: int


def _bos(tokenizer: Any, text: str) -> list[int]:
    return [tokenizer.bos_token_id] if needs_bos(tokenizer, text) else []


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """BOS (see :func:`metareason.data.chat.needs_bos`) + the prompt's tokens, no other specials;
    the same in training and generation."""
    return _bos(tokenizer, prompt) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_examples(tokenizer: Any, prompts: list[str], completions: list[str], max_length: int,
                    append_eos: bool = True) -> Encoded:
    """``append_eos=False`` for chat-rendered completions, which end with the template's end-of-turn."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and append_eos else []
    out, plens, truncated = [], [], 0
    for text, p, c in zip(prompts, p_ids, c_ids):
        bos = _bos(tokenizer, text)
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

    With ``group_by_length`` the epoch's permutation is cut into mega-chunks of
    ``GROUP_CHUNK`` batches; each chunk is sorted by length, split into batches, and the batches
    are shuffled again: batches hold examples of similar length (little padding), their order
    stays random. An epoch is ``len // batch_size`` full batches (the remainder waits for the
    next epoch's permutation). ``position`` counts examples consumed; it is saved in checkpoints
    and restored on resume, and the batches are a pure function of (seed, position).
    """

    GROUP_CHUNK = 50

    def __init__(self, examples: list[dict], encoded: Encoded, batch_size: int, seed: int, pad_id: int,
                 group_by_length: bool = False):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples is fewer than one batch of {batch_size}")
        self.examples, self.encoded = examples, encoded
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.group_by_length = group_by_length
        self.batches_per_epoch = len(examples) // batch_size
        self.position = 0
        self._epoch = -1
        self._batches: list[list[int]] = []

    def _batches_for(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples), generator=g).tolist()
            bs = self.batch_size
            order = order[: self.batches_per_epoch * bs]
            if not self.group_by_length:
                batches = [order[i: i + bs] for i in range(0, len(order), bs)]
            else:
                batches = []
                chunk = bs * self.GROUP_CHUNK
                lengths = self.encoded.input_ids
                for c in range(0, len(order), chunk):
                    part = sorted(order[c: c + chunk], key=lambda i: len(lengths[i]))
                    group = [part[i: i + bs] for i in range(0, len(part), bs)]
                    perm = torch.randperm(len(group), generator=g).tolist()
                    batches.extend(group[p] for p in perm)
            self._batches, self._epoch = batches, epoch
        return self._batches

    def next_batch(self) -> dict:
        epoch, b = divmod(self.position // self.batch_size, self.batches_per_epoch)
        idx = self._batches_for(epoch)[b]
        self.position += self.batch_size
        rows = [self.encoded.input_ids[i] for i in idx]
        batch = collate(rows, [self.encoded.prompt_lengths[i] for i in idx], self.pad_id)
        batch["examples"] = [self.examples[i] for i in idx]
        batch["epoch"] = epoch  # int: lets label hooks re-draw per epoch, reproducibly
        return batch

    @property
    def epoch(self) -> float:
        return self.position / (self.batches_per_epoch * self.batch_size)

