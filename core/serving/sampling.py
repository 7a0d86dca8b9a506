"""Per-row token choice for a batch whose rows have their own sampling parameters.

Greedy rows take the argmax of the float32 logits (as :mod:`metareason.generation.decode` does, so greedy
text equals ``metareason eval``'s). Sampled rows are scaled by their own temperature, cut by the
model's ``top_k`` (its generation config) and their own ``top_p`` with the same tensor operations
as ``generate``'s warpers, and drawn with ``torch.multinomial`` from their request's
``torch.Generator`` (a request with a ``seed`` gets its own; the others share the server's), so a
seeded request's samples do not depend on what else is in the batch. Log-probabilities are the
model's own (``log_softmax`` of the raw logits), as evaluation harnesses expect.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

#: temperatures below this are greedy (dividing by them overflows float32 logits)
MIN_TEMPERATURE = 1e-4


def choose(scores: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
           generators: Sequence[Optional[torch.Generator]], default: torch.Generator,
           top_k: Optional[int] = None) -> list[int]:
    """One token per row of ``scores`` ``[B, V]`` (float32, processed only here)."""
    tokens = scores.argmax(-1)
    rows = [i for i, t in enumerate(temperatures) if t >= MIN_TEMPERATURE]
    if rows:
        idx = torch.tensor(rows, dtype=torch.long, device=scores.device)
        temp = torch.tensor([temperatures[i] for i in rows], dtype=scores.dtype, device=scores.device)
        s = scores.index_select(0, idx) / temp[:, None]
        if top_k is not None and top_k < s.shape[-1]:
            s = s.masked_fill(s < torch.topk(s, top_k)[0][..., -1, None], -float("inf"))
        top_p = torch.tensor([top_ps[i] for i in rows], dtype=scores.dtype, device=scores.device)
        if bool((top_p < 1.0).any()):
            sorted_logits, sorted_indices = torch.sort(s, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p[:, None])
            remove[..., -1:] = 0
            s = s.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
        probs = torch.softmax(s, dim=-1)
        for j, i in enumerate(rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i] or default)[0]
    return tokens.tolist()


def logprobs(scores: torch.Tensor, rows: Sequence[int], tokens: Sequence[int], k: int
             ) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each of ``rows``: the chosen token's log-probability and the ``k`` most likely tokens'."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=scores.device)
    lp = torch.log_softmax(scores.index_select(0, idx), dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=scores.device)).squeeze(1).tolist()
    out = []
    if k > 0:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in rows]
    for c, t in zip(chosen, tops):
        out.append((c, t))
    return out


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int, chunk: int = 256
                    ) -> list[Optional[tuple[float, list[tuple[int, float]]]]]:
    """Log-probability of every prompt token given the ones before it (``None`` for the first),
    from the prefill's logits ``[P, V]``; ``chunk`` positions at a time to bound memory."""
    out: list[Optional[tuple[float, list[tuple[int, float]]]]] = [None]
    target = torch.tensor(list(ids[1:]), dtype=torch.long, device=logits.device)
    for a in range(0, len(ids) - 1, chunk):
        lp = torch.log_softmax(logits[a: a + chunk].float(), dim=-1)[: len(target) - a]
        chosen = lp.gather(1, target[a: a + lp.shape[0], None]).squeeze(1).tolist()
        if k > 0:
            values, top = lp.topk(min(k, lp.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top.tolist(), values.tolist())]
        else:
            tops = [[] for _ in chosen]
        out.extend(zip(chosen, tops))
    return out
