"""The format term with a gradient: ``1 - format_reward``, the reward differentiable.

The seed adds ``bf_beta * (1 - reward)`` where the reward is a regex over the argmax of the
teacher-forced logits: a constant, so ``bf_beta`` changes no gradient. Here the reward is the
mean teacher-forced probability of the structure tokens (the eight tags) at the positions where
they stand in the target: ``reward = mean_t p_theta(tag_t | prefix_<t)``. It is 1 exactly when
the model puts all its mass on the format, and its gradient raises the tags' probabilities.

SFT: positions are the completion tokens (from ``prompt_lengths``) that are tags, whatever the
labels (critique masking does not remove a tag from the format term). RL: the tags among the
sampled completion tokens, their probabilities from the loop's per-token log-probs.
"""
from __future__ import annotations

from typing import Optional

import torch


def structure_positions(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, attention_mask: torch.Tensor,
                        tag_ids: list[int]) -> torch.Tensor:
    """``[B, T]`` bool: completion positions ``t >= 1`` holding a tag token."""
    B, T = input_ids.shape
    is_tag = torch.isin(input_ids, torch.tensor(tag_ids, device=input_ids.device))
    completion = torch.arange(T, device=input_ids.device).unsqueeze(0) >= prompt_lengths.to(input_ids.device).unsqueeze(1)
    pos = is_tag & completion & attention_mask.to(input_ids.device).bool()
    pos[:, 0] = False
    return pos


def sft_format_term(logits: torch.Tensor, input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                    attention_mask: torch.Tensor, tag_ids: list[int]) -> Optional[torch.Tensor]:
    """``1 - mean p(tag)`` over the tag positions of the batch; ``None`` when there are none."""
    pos = structure_positions(input_ids, prompt_lengths, attention_mask, tag_ids).to(logits.device)
    if not bool(pos.any()):
        return None
    b, t = pos.nonzero(as_tuple=True)
    rows = logits[b, t - 1].float()  # the logits at t-1 predict token t
    targets = input_ids.to(logits.device)[b, t]
    p = torch.softmax(rows, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return 1.0 - p.mean()


def rl_format_term(logps: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   tag_ids: list[int]) -> Optional[torch.Tensor]:
    """``1 - mean p(tag)`` over the tags among the sampled completion tokens."""
    ids = completion_ids.to(logps.device)
    pos = torch.isin(ids, torch.tensor(tag_ids, device=ids.device)) & completion_mask.to(logps.device).bool()
    if not bool(pos.any()):
        return None
    return 1.0 - logps.float()[pos].exp().mean()
