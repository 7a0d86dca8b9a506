"""The group-rollout RL objective (GRPO family) as pure tensor functions.

Semantics follow TRL 1.16's ``GRPOTrainer`` (``_generate_and_score_completions`` and
``_compute_loss``) for the options the kernel exposes; ``tests/test_grpo_loss.py`` checks them
against hand-written formulas and against TRL itself.

* :func:`group_advantages` — ``A = r - mean_group(r)``, divided by ``std + 1e-4`` (unbiased std
  of the group, of the whole batch, or not at all); NaN rewards (a completion no reward
  function scored) are left out of the statistics and get advantage 0.
* :func:`grpo_loss` — the token objective of ``loss_type`` (the clipped
  ``-min(ρA, clip(ρ, 1-ε, 1+ε_high)A)`` of grpo/bnpo/dr_grpo/dapo/luspo, or cispo's, sapo's,
  vespo's) with ``ρ = exp(logp - old_logp)`` per token or, with ``importance_sampling_level:
  sequence`` (GSPO), ``exp`` of the sequence's mean log-ratio; plus ``β·k3`` KL to a reference
  (times ρ, TRL's ``use_bias_correction_kl``); aggregated by ``loss_type``; minus
  ``entropy_coef`` times the mean token entropy.
* :func:`completion_logps` — per-token log-probabilities of the sampled tokens (and, when asked,
  the entropies of the distributions they were drawn from) from one forward that keeps only the
  completion's logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-style clipped surrogate
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VESPO_LOG_W_MIN = math.log(1e-8)  # TRL clamps the sequence log-weight to [log 1e-8, 20]
SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaNs (NaN where fewer than two values)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim).to(x.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * correction)


def group_std(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Per-completion std used by :func:`group_advantages` (group std for ``none`` as well)."""
    if scale_rewards in ("group", "none"):
        return nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        return nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    raise ValueError(f"scale_rewards: {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-relative advantages of ``rewards`` ``[B*G]`` (completions of a prompt are adjacent)."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards: expected [B*{num_generations}] values, got shape {tuple(rewards.shape)}")
    std = group_std(rewards, num_generations, scale_rewards)
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def importance_log_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``log ρ``: the token log-ratios ``[B, T]``, or (``sequence``, GSPO) each row's masked mean
    ``[B, 1]`` (one ratio per completion, so its gradient reaches every loss token of the row)."""
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _by_sign(condition: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    """``if_true`` where ``condition`` else ``if_false``, in ``like``'s dtype (TRL builds these
    in float32; the same values in float32 training)."""
    return torch.where(condition, torch.tensor(if_true, dtype=like.dtype, device=like.device),
                       torch.tensor(if_false, dtype=like.dtype, device=like.device))


@torch.no_grad()
def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, k_pos: float,
                  lambda_pos: float, k_neg: float, lambda_neg: float) -> torch.Tensor:
    """VESPO's gamma weight ``φ(w) = exp(λ + k·log w − λ·w)`` (``φ(1) = 1``) of the sequence ratio
    ``w = exp(Σ_t m_t·clamp(log ρ_t, ±20))`` (a sum, not GSPO's mean), ``log w`` clamped to
    ``[log 1e-8, 20]``; ``(k, λ)`` are the ``pos`` pair where ``A ≥ 0``; ``λ ≥ 1e-4``; a non-finite
    ``φ`` is 0. Detached: it only scales the gradient of ``A·log π``. ``[B, 1]``."""
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(VESPO_LOG_W_MIN, 20.0)
    nonneg = advantages >= 0
    k = _by_sign(nonneg, k_pos, k_neg, log_w)
    lam = _by_sign(nonneg, lambda_pos, lambda_neg, log_w).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, loss_mask: torch.Tensor, *, epsilon: float,
              epsilon_high: Optional[float], beta: float, loss_type: str, max_completion_length: int,
              num_items: Optional[float] = None, grad_accum: int = 1,
              kl_bias_correction: bool = True, importance_sampling_level: str = "token",
              entropies: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
              vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
              vespo_lambda_neg: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, scaled so that summing the micro-batches of a step gives TRL's loss.

    ``logps``/``old_logps``/``ref_logps`` ``[B, T]``: log-probs of the sampled tokens under the
    current, sampling-time and reference policy. ``old_logps=None`` means "sampled by the current
    weights" (``logps.detach()``, TRL's path when ``num_iterations == 1``). ``ref_logps`` is
    only read when ``beta > 0``. ``advantages`` ``[B]``; ``loss_mask`` ``[B, T]``.
    ``entropies`` ``[B, T]`` (from the forward that gave ``logps``) is only read when
    ``entropy_coef != 0``. Option names and defaults are TRL's ``GRPOConfig``'s.

    Token objective ``ℓ_t`` (``ρ`` per ``importance_sampling_level``, see
    :func:`importance_log_weights`; ``ε_high`` defaults to ``epsilon``):

    * ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``: ``-min(ρA, clip(ρ, 1-ε, 1+ε_high)A)``;
    * ``cispo``: ``-sg(min(ρ, ε_high))·A·logp`` — the clipped ratio is a detached weight;
    * ``sapo``: ``-(4/τ)·σ(τ(ρ-1))·A`` with ``τ = sapo_temperature_pos`` where ``A > 0``, else
      ``sapo_temperature_neg`` (a soft gate: slope 1 at ``ρ = 1``, fading off-policy);
    * ``vespo``: ``-φ(w)·A·logp`` (:func:`vespo_weights`; always the token log-ratios).

    Aggregation over the mask ``m`` (``grad_accum`` micro-batches per optimizer step):

    * ``grpo``, ``sapo``: mean over sequences of each sequence's token mean, ``/ grad_accum``;
    * ``bnpo``: token mean of this micro-batch, ``/ grad_accum``;
    * ``dr_grpo``: token sum ``/ (B * max_completion_length) / grad_accum``;
    * ``luspo``: mean over sequences of each sequence's token sum, ``/ grad_accum``;
    * ``dapo``, ``cispo``, ``vespo``: token sum ``/ num_items`` — the loss tokens of the *whole*
      step (all micro-batches), so the step's loss is the token mean over the step; defaults to
      this micro-batch's count.

    The entropy bonus is ``-entropy_coef`` times this micro-batch's masked token mean of
    ``entropies``, ``/ grad_accum``, whatever the loss type (TRL's).

    Returns ``(loss, stats)``; ``stats`` are detached: ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (clipped objectives), ``cispo_clip_ratio``,
    ``vespo/phi_seq_mean``, ``kl`` (when ``beta > 0``), ``entropy`` (when given): masked token
    means (sequence-level values: means over rows, as TRL); ``tokens`` (loss tokens here) and
    ``policy_loss`` (unscaled, without the entropy bonus).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level: {importance_sampling_level!r} is not one of "
                         f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if logps.shape != loss_mask.shape:
        raise ValueError(f"loss_mask: shape {tuple(loss_mask.shape)} does not match logps {tuple(logps.shape)}")
    mask = loss_mask.to(logps.dtype)
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if old_logps is None:
        old_logps = logps.detach()
    adv = advantages.to(logps.dtype).unsqueeze(1) if advantages.dim() == 1 else advantages.to(logps.dtype)

    log_ratio = logps - old_logps
    coef_1 = torch.exp(importance_log_weights(log_ratio, mask, importance_sampling_level))
    phi = None
    if loss_type in CLIPPED:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * logps
    elif loss_type == "sapo":
        tau = _by_sign(adv > 0, sapo_temperature_pos, sapo_temperature_neg, adv)
        per_token_loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    else:  # vespo
        phi = vespo_weights(log_ratio, mask, adv, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        per_token_loss = -phi * adv * logps
    per_token_kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps: required when beta > 0")
        diff = ref_logps - logps
        per_token_kl = torch.exp(diff) - diff - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * coef_1
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        policy_loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        loss = policy_loss / grad_accum
    elif loss_type == "bnpo":
        policy_loss = masked.sum() / mask.sum().clamp(min=1.0)
        loss = policy_loss / grad_accum
    elif loss_type == "dr_grpo":
        policy_loss = masked.sum() / (logps.shape[0] * max_completion_length)
        loss = policy_loss / grad_accum
    elif loss_type == "luspo":
        policy_loss = masked.sum(-1).mean()
        loss = policy_loss / grad_accum
    else:  # dapo, cispo, vespo
        normalizer = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype, device=logps.device)
        policy_loss = masked.sum() / normalizer.clamp(min=1.0)
        loss = policy_loss
    if entropy_coef != 0.0:
        if entropies is None:
            raise ValueError("entropies: required when entropy_coef != 0")
        mean_entropy = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
        loss = loss - entropy_coef * (mean_entropy / grad_accum)

    with torch.no_grad():
        tokens = mask.sum()

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] == 1 and importance_sampling_level == "sequence":
                return x.mean()  # one value per sequence (TRL: a plain mean over rows)
            return (x * mask).sum() / tokens.clamp(min=1.0)

        stats = {"tokens": tokens, "policy_loss": policy_loss.detach()}
        if loss_type in CLIPPED:
            low = (coef_1 < 1 - eps_low) & (adv < 0)
            high = (coef_1 > 1 + eps_high) & (adv > 0)
            stats.update({"clip_ratio/low_mean": masked_mean(low.to(mask.dtype)),
                          "clip_ratio/high_mean": masked_mean(high.to(mask.dtype)),
                          "clip_ratio/region_mean": masked_mean((low | high).to(mask.dtype))})
        elif loss_type == "cispo":
            stats["cispo_clip_ratio"] = masked_mean(((coef_1 > eps_high) & (adv > 0)).to(mask.dtype))
        elif phi is not None:
            stats["vespo/phi_seq_mean"] = phi.mean()
        if per_token_kl is not None:
            stats["kl"] = masked_mean(per_token_kl.detach())
        if entropies is not None:
            stats["entropy"] = masked_mean(entropies.detach())
    return loss, stats


def completion_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     logits_to_keep: int, temperature: float = 1.0, chunk_tokens: int = 8192,
                     return_outputs: bool = False, return_entropy: bool = False, fused: bool = False):
    """Log-probs ``[B, logits_to_keep]`` of the last ``logits_to_keep`` tokens of ``input_ids``
    (with ``return_entropy``: ``(logps, entropies)``, see :func:`token_logps`; with
    ``return_outputs`` the model's outputs come last).

    One forward that computes logits only for the positions that predict those tokens
    (``logits_to_keep + 1`` kept, the last dropped). Logits are divided by ``temperature``
    (the sampling distribution, as TRL does). Prompts may be left-padded: with padding in
    ``attention_mask`` the position ids are the mask's cumulative sum (as ``generate`` numbers
    them); without, the mask is not passed at all (a right-padded tail cannot be attended by
    causal attention), which keeps the fast causal attention path. ``fused``: the model's output
    layer and the log-softmax run fused from the final hidden states
    (:class:`metareason.train.fused_ce.HiddenStatesLM`), no ``[B, T, V]`` logits; the returned
    outputs' ``logits`` are then those hidden states.
    """
    lm, logps_of = _forward_and_logps(model, fused)
    kwargs = {}
    if attention_mask is not None:
        prompt_part = attention_mask[:, : input_ids.shape[1] - logits_to_keep]
        if not bool(prompt_part.all()):
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    outputs = lm(input_ids=input_ids, logits_to_keep=logits_to_keep + 1, use_cache=False, **kwargs)
    got = logps_of(outputs.logits[:, :-1], input_ids[:, -logits_to_keep:], temperature, chunk_tokens,
                   return_entropy)
    if not return_outputs:
        return got
    return (*got, outputs) if return_entropy else (got, outputs)


def shared_prompt_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        logits_to_keep: int, temperature: float = 1.0, chunk_tokens: int = 8192,
                        return_entropy: bool = False, fused: bool = False):
    """:func:`completion_logps` computing each distinct prompt once (rows of a group share it).

    Consecutive rows with the same prompt (tokens and mask) form a group: the prompts run once,
    with a KV cache, the cache is indexed out to every row (a differentiable gather, so each
    prompt's gradient is the sum over its completions), and the completions run on top. Same
    values as :func:`completion_logps` up to rounding, with ``(G-1)/G`` of the prompt work saved.
    Needs a model whose forward fills a ``DynamicCache`` (no gradient checkpointing).
    """
    from transformers import DynamicCache

    from metareason.models.compat import CACHE_KWARG

    model, logps_of = _forward_and_logps(model, fused)
    width = input_ids.shape[1] - logits_to_keep
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    key = torch.cat([input_ids[:, :width], attention_mask[:, :width].long()], dim=1)
    unique, inverse = torch.unique_consecutive(key, dim=0, return_inverse=True)
    prompts, prompt_mask = unique[:, :width], unique[:, width:]
    padded = not bool(prompt_mask.all())
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache(config=config)
    kwargs = {}
    if padded:
        kwargs = {"attention_mask": prompt_mask, "position_ids": (prompt_mask.cumsum(-1) - 1).clamp(min=0)}
    first = model(input_ids=prompts, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]
    cache.batch_select_indices(inverse)
    logits = first[inverse].unsqueeze(1)
    if logits_to_keep > 1:
        rest = input_ids[:, width:-1]
        kwargs = {}
        if padded:
            kwargs = {"attention_mask": attention_mask[:, :-1],
                      "position_ids": prompt_mask.sum(-1)[inverse].unsqueeze(1)
                      + torch.arange(rest.shape[1], device=rest.device)}
        out = model(input_ids=rest, **{CACHE_KWARG: cache}, use_cache=True, **kwargs)
        logits = torch.cat([logits, out.logits], dim=1)
    return logps_of(logits, input_ids[:, width:], temperature, chunk_tokens, return_entropy)


def _forward_and_logps(model, fused: bool):
    """(what to call as the model, what turns its ``.logits`` into log-probs): the model and
    :func:`token_logps`, or (``fused``) its decoder and the fused output layer."""
    if not fused:
        return model, token_logps
    from metareason.train.fused_ce import HiddenStatesLM

    lm = HiddenStatesLM(model)
    return lm, lm.token_logps


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                chunk_tokens: int = 8192, return_entropy: bool = False):
    """``log softmax(logits / T)[target]`` as ``logit[target] - logsumexp(logits)``, in row chunks:
    no full-vocabulary log-softmax copy is kept for backward.

    With ``return_entropy`` also the entropy of each ``softmax(logits / T)`` (the sampling
    distribution, as TRL's), ``logsumexp(z) - Σ p·z``, differentiable: ``(logps, entropies)``.
    That one keeps each chunk's probabilities for backward (the entropy's gradient needs them).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1, 1)
    parts, entropies = [], []
    for start in range(0, flat.shape[0], chunk_tokens):
        chunk = flat[start: start + chunk_tokens]
        if chunk.dtype in (torch.float16, torch.bfloat16):
            chunk = chunk.float()
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, flat_targets[start: start + chunk_tokens]).squeeze(-1)
        log_z = torch.logsumexp(chunk, dim=-1)
        parts.append(picked - log_z)
        if return_entropy:
            entropies.append(log_z - (torch.softmax(chunk, dim=-1) * chunk).sum(-1))

    def joined(xs: list[torch.Tensor]) -> torch.Tensor:
        return (xs[0] if len(xs) == 1 else torch.cat(xs)).view(targets.shape)

    return (joined(parts), joined(entropies)) if return_entropy else joined(parts)
