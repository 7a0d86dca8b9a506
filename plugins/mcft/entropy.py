"""Entropy-based failure flags and how well they predict a wrong answer.

The mean token entropy of a completion is computed by one teacher-forced forward over prompt +
completion (the same next-token distributions the sampler drew from at temperature 1): for
each completion token ``t``, ``H_t = -sum_v p(v | prefix_<t) log p(v | prefix_<t)`` in nats;
the completion's score is the mean over its tokens. A completion is flagged when the score
exceeds ``mcft.entropy_threshold``. The flag is judged as a predictor of a wrong answer:
precision, recall, and the AUROC of the raw score (threshold-free).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


@torch.no_grad()
def completion_entropies(model, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                         batch_size: int = 32) -> list[float]:
    """Mean next-token entropy (nats) over each completion's tokens; NaN for an empty completion."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            ps, cs = prompt_ids[start: start + batch_size], completion_ids[start: start + batch_size]
            rows = [list(p) + list(c) for p, c in zip(ps, cs)]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            logits = model(input_ids=ids.to(device), use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            ent = -(logp.exp() * logp).sum(-1)  # [B, T]: entropy of the distribution at each position
            for i, (p, c) in enumerate(zip(ps, cs)):
                if not len(c) or not len(p):
                    out.append(math.nan)
                    continue
                # completion token j (0-based) is predicted at position len(p) - 1 + j
                out.append(float(ent[i, len(p) - 1: len(p) - 1 + len(c)].mean()))
    finally:
        model.train(was_training)
    return out


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney).
    NaN when either class is empty."""
    pos = [s for s, y in zip(scores, positives) if y]
    neg = [s for s, y in zip(scores, positives) if not y]
    if not pos or not neg:
        return math.nan
    ranked = sorted(scores)
    # average ranks (1-based) with ties
    ranks: dict[float, float] = {}
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1] == ranked[i]:
            j += 1
        ranks[ranked[i]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = sum(ranks[s] for s in pos)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def flag_metrics(entropies: Sequence[float], correct: Sequence[bool], threshold: float) -> dict[str, float]:
    """Flags (entropy > threshold) as predictions of a wrong answer."""
    pairs = [(e, c) for e, c in zip(entropies, correct) if not math.isnan(e)]
    ents = [e for e, _ in pairs]
    wrong = [not c for _, c in pairs]
    flagged = [e > threshold for e in ents]
    tp = sum(f and w for f, w in zip(flagged, wrong))
    n_flag, n_wrong = sum(flagged), sum(wrong)
    return {
        "flagged": n_flag,
        "flag_rate": n_flag / len(pairs) if pairs else math.nan,
        "wrong": n_wrong,
        "precision": tp / n_flag if n_flag else math.nan,
        "recall": tp / n_wrong if n_wrong else math.nan,
        "auroc": auroc(ents, wrong),
        "mean_entropy_correct": _mean([e for e, w in zip(ents, wrong) if not w]),
        "mean_entropy_wrong": _mean([e for e, w in zip(ents, wrong) if w]),
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
