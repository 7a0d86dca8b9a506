"""The kernel's group-rollout RL loop (GRPO family), method-neutral.

One *generation* takes ``train.batch_size`` prompts from ``data.train`` and samples
``rl.num_generations`` completions for each (``core/generation/generate.py``: the model's own ``generate``
with its KV cache). Registered reward functions (``rl.rewards``, name -> weight) score them;
advantages are group-relative (``grpo_loss.group_advantages``). The token loss mask is the
completion mask (real tokens up to and including EOS), minus truncated completions when
``rl.mask_truncated_completions``, AND-ed with every ``metareason_rl_loss_mask`` result.
A generation is used for ``rl.num_iterations`` optimizer steps; each step runs
``train.grad_accum`` micro-batches over its completions. Each micro-batch's loss also gets the
weighted terms of ``metareason_extra_losses`` (divided by ``grad_accum``; logged as
``train/<name>``, the micro-batch mean), as in the SFT loop. With ``num_iterations > 1`` the
sampling-time log-probs are computed once per generation; with 1 they are the current ones,
detached (TRL's shortcut: the ratio is exactly 1 and only its gradient acts). A reference model
exists only when ``rl.beta > 0`` (a frozen copy, or the PEFT base with adapters disabled).
A group's prompt is computed once, in the rollout's prefill and in the log-prob forwards
(``rl.share_prompt_forward``; checked against the plain forward at the start of a run).

Checkpoints, exact resume, the NaN stop, evaluation, events and logging work as in the SFT
loop; a checkpoint written in the middle of a generation's iterations also holds the rollout
(``rollout.safetensors``), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import copy
import inspect
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from metareason.checkpoint import save_checkpoint
from metareason.config import ConfigError
from metareason.plugin_manager import PluginError
from metareason.train.fused_ce import fused_ce_mode
from metareason.train.grpo_loss import (completion_logps, group_advantages, group_std, grpo_loss, nanstd,
                                        shared_prompt_logps)
from metareason.train.lean_act import lean_activations_mode, unpatch
from metareason.train.loop import RunDriver, check_finite, load_train_examples, prepare_run_dir, seed_everything
from metareason.train.optim import build_optimizer, build_scheduler
from metareason.train.sft import autocast_context, collect_extra_losses

ROLLOUT_FILE = "rollout.safetensors"
REWARD_EXTRAS = ("completion_ids", "completion_lengths", "truncated", "tokenizer", "prompts", "tasks", "config")


# ------------------------------------------------------------------------------------------ data
class PromptStream:
    """Batches of examples, reshuffled each epoch by ``seed + epoch``; ``position`` (examples
    consumed) is saved in checkpoints, and the batches are a pure function of (seed, position)."""

    def __init__(self, examples: list[dict], batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples is fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.batches_per_epoch = len(examples) // batch_size
        self.position = 0
        self._epoch, self._order = -1, []

    def next_batch(self) -> list[dict]:
        epoch, b = divmod(self.position // self.batch_size, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(len(self.examples), generator=g).tolist(), epoch
        self.position += self.batch_size
        return [self.examples[i] for i in self._order[b * self.batch_size: (b + 1) * self.batch_size]]

    @property
    def epoch(self) -> float:
        return self.position / (self.batches_per_epoch * self.batch_size)


# --------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One generation: ``N = prompts x num_generations`` rows, completions of a prompt adjacent."""

    input_ids: torch.Tensor  # [N, P + C] left-padded prompt + right-padded completion
    attention_mask: torch.Tensor  # [N, P + C]
    completion_mask: torch.Tensor  # [N, C] bool: real completion tokens (EOS included)
    loss_mask: torch.Tensor  # [N, C] bool
    advantages: torch.Tensor  # [N]
    old_logps: Optional[torch.Tensor] = None  # [N, C] when num_iterations > 1
    ref_logps: Optional[torch.Tensor] = None  # [N, C] when beta > 0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    @property
    def num_items(self) -> int:
        return int(self.loss_mask.sum())

    def micro_batch(self, rows: slice) -> dict[str, Any]:
        """Rows of one micro-batch, cut after their longest completion (less work, same loss)."""
        cmask = self.completion_mask[rows]
        width = max(1, int(cmask.any(0).nonzero().max()) + 1) if bool(cmask.any()) else 1
        cut = self.input_ids.shape[1] - self.completion_len + width
        out = {"input_ids": self.input_ids[rows, :cut], "attention_mask": self.attention_mask[rows, :cut],
               "loss_mask": self.loss_mask[rows, :width], "advantages": self.advantages[rows], "width": width}
        for name in ("old_logps", "ref_logps"):
            value = getattr(self, name)
            out[name] = None if value is None else value[rows, :width]
        return out

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f.name: getattr(self, f.name).contiguous().cpu() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        save_file(tensors, str(Path(directory) / ROLLOUT_FILE))

    @classmethod
    def load(cls, directory: Path, stats: dict, device: torch.device) -> "Rollout":
        from safetensors.torch import load_file

        tensors = {k: v.to(device) for k, v in load_file(str(Path(directory) / ROLLOUT_FILE)).items()}
        return cls(stats=dict(stats), **tensors)


def micro_batch_rows(n: int, grad_accum: int) -> list[slice]:
    size = n // grad_accum
    return [slice(i * size, (i + 1) * size) for i in range(grad_accum)]


# --------------------------------------------------------------------------------------- rewards
def _accepted_extras(fn) -> Optional[set[str]]:
    """Names of REWARD_EXTRAS that ``fn`` accepts (``None``: all, it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in REWARD_EXTRAS if n in params}


def compute_rewards(kernel, completions: list[str], examples: list[dict], extras: dict[str, Any]) -> torch.Tensor:
    """``[N, F]`` float32 rewards of the functions in ``rl.rewards`` (NaN where one returned None)."""
    names = list(kernel.config.rl.rewards)
    out = torch.empty(len(completions), len(names), dtype=torch.float32)
    for j, name in enumerate(names):
        fn = kernel.rewards.get(name)
        accepted = _accepted_extras(fn)
        kwargs = dict(extras) if accepted is None else {k: v for k, v in extras.items() if k in accepted}
        owner = kernel.rewards.owner(name)
        try:
            values = fn(completions, examples, **kwargs)
        except Exception as exc:
            raise PluginError(f"plugin '{owner}' reward {name!r} failed: {type(exc).__name__}: {exc}",
                              plugin=owner) from exc
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise PluginError(f"plugin '{owner}' reward {name!r} returned {len(values)} values for "
                              f"{len(completions)} completions", plugin=owner)
        try:
            out[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise PluginError(f"plugin '{owner}' reward {name!r} returned a value that is not a number",
                              plugin=owner) from None
    return out


def total_reward(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum per completion, NaN-skipping; NaN where every function returned None."""
    total = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_func).all(dim=1)] = math.nan
    return total


# ------------------------------------------------------------------------------------- loss mask
def rl_loss_mask(kernel, completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer: Any,
                 truncated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Completion mask, minus ``truncated`` rows when given, AND every plugin's mask."""
    mask = completion_mask.bool().clone()
    if truncated is not None:
        mask &= ~truncated.bool().unsqueeze(1)
    got_each = kernel.call_each("metareason_rl_loss_mask", completion_ids=completion_ids,
                                completion_mask=completion_mask.bool(), tokenizer=tokenizer, config=kernel.config)
    for plugin_name, got in got_each:
        if got is None:
            continue
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(mask.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise PluginError(f"plugin '{plugin_name}' hook 'metareason_rl_loss_mask' returned {shape}, "
                              f"expected a [B, T] = {tuple(mask.shape)} mask", plugin=plugin_name)
        mask &= got.to(mask.device).bool()
    return mask


# ------------------------------------------------------------------------------------ generation
def _completion_ids(gen, tokenizer) -> list[int]:
    """Generated ids with the EOS that ended them (``generate_batch`` cuts it off)."""
    ids = list(gen.token_ids)
    if gen.stop_reason == "eos" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def sampling_defaults(tokenizer) -> dict[str, Any]:
    """Plain sampling from the policy (as TRL): no top-k cut (``generate`` defaults to 50). A pad
    token that is not EOS is never sampled: a sampled pad could not be told from padding."""
    out: dict[str, Any] = {"top_k": 0}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        out["suppress_tokens"] = [tokenizer.pad_token_id]
    return out


class LogProbs:
    """The log-prob forward of the run, and whether rollouts prefill each group's prompt once.

    With ``rl.share_prompt_forward`` (and no gradient checkpointing, which disables the KV
    cache in training) :func:`shared_prompt_logps` and ``generate_batch(share_prompts=True)`` are
    used if :func:`shared_prompt_logps` reproduces :func:`completion_logps` on a probe batch
    (checked once, in eval mode; a model whose forward cannot continue from a cache fails it);
    otherwise the plain forward and a plain prefill. Either forward runs with the output layer
    fused into the log-softmax when ``train.fused_ce`` allows (:mod:`metareason.train.fused_ce`:
    no ``[B, T, V]`` logits; the loop's hooks get ``logps``, never logits).
    """

    def __init__(self, kernel, model):
        rl = kernel.config.rl
        self.temperature, self.autocast = rl.temperature, kernel.config.train.autocast
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        self.fn = None if rl.share_prompt_forward and not checkpointing else completion_logps
        self.fused, self.fused_line = fused_ce_mode(kernel.config.train.fused_ce, model)

    @property
    def shared(self) -> bool:
        return self.fn is shared_prompt_logps

    def decide(self, model, tokenizer, prompts: list[str], device) -> None:
        """Choose the forward on a probe: two prompts, each twice, with a 3-token completion."""
        if self.fn is not None:
            return
        from metareason.generation.generate import encode_prompts

        rows = [p for p in (prompts[:2] * 2)[:2] for _ in range(2)]
        enc = encode_prompts(tokenizer, rows, device)
        comp = enc["input_ids"][:1, -3:].expand(len(rows), -1)
        mb = {"input_ids": torch.cat([enc["input_ids"], comp], 1),
              "attention_mask": torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1), "width": 3}
        self.fn = self._choose(model, mb)

    def __call__(self, model, mb: dict, device, return_entropy: bool = False):
        """Log-probs ``[B, width]``; with ``return_entropy``, ``(logps, entropies)`` of the same forward."""
        if self.fn is None:
            self.fn = self._choose(model, mb)
        with autocast_context(self.autocast, device):
            return self.fn(model, mb["input_ids"], mb["attention_mask"], mb["width"], temperature=self.temperature,
                           return_entropy=return_entropy, fused=self.fused)

    @torch.no_grad()
    def no_grad(self, model, mb: dict, device) -> torch.Tensor:
        return self(model, mb, device).float()

    @torch.no_grad()
    def _choose(self, model, mb: dict):
        device = mb["input_ids"].device
        was_training = model.training
        model.eval()
        try:
            with autocast_context(self.autocast, device):
                args = (model, mb["input_ids"], mb["attention_mask"], mb["width"])
                plain = completion_logps(*args, temperature=self.temperature, fused=self.fused).float()
                try:
                    shared = shared_prompt_logps(*args, temperature=self.temperature, fused=self.fused).float()
                except Exception as exc:  # a model whose forward cannot continue from a cache this way
                    shared, why = None, f"{type(exc).__name__}: {exc}"
        finally:
            model.train(was_training)
        full_precision = all(p.dtype == torch.float32 for p in model.parameters()) and self.autocast != "bf16"
        tol = 1e-3 if full_precision else 5e-2
        if shared is not None:
            diff = float((plain - shared).abs().max()) if plain.numel() else 0.0
            if diff <= tol:
                return shared_prompt_logps
            why = f"max |delta log p| = {diff:.2e}"
        print(f"[metareason] rl.share_prompt_forward: the shared-prompt forward does not reproduce the plain one "
              f"for this model ({why}); using the plain forward", file=sys.stderr)
        return completion_logps


def generate_rollout(kernel, model, tokenizer, examples: list[dict], ref_model=None,
                     logprobs: Optional[LogProbs] = None, sampler=None, version: int = 0) -> Rollout:
    """Sample, score and prepare one generation of ``len(examples) * num_generations`` completions.

    ``sampler(model, tokenizer, prompts, version=, share_prompts=)``, when given, samples instead
    of this process (``metareason.scale.rollout``: Ray rollout actors); ``version`` is the step.
    """
    from metareason.generation.generate import encode_prompts, generate_batch

    cfg, rl, tc = kernel.config, kernel.config.rl, kernel.config.train
    device = next(model.parameters()).device
    G = rl.num_generations
    t0 = time.perf_counter()
    fmt = kernel.chat_format(tokenizer)
    prompts = [kernel.prompt_text(e, tokenizer, fmt) for e in examples]
    row_prompts = [p for p in prompts for _ in range(G)]
    row_examples = [e for e in examples for _ in range(G)]
    gen_kwargs = dict(sampling_defaults(tokenizer), **rl.generation_kwargs)
    share = logprobs is not None and logprobs.shared
    if sampler is not None:
        gens = sampler(model, tokenizer, prompts, version=version, share_prompts=share)
    else:
        gens = []
        for start in range(0, len(row_prompts), cfg.generation.batch_size):
            gens += generate_batch(model, tokenizer, row_prompts[start: start + cfg.generation.batch_size],
                                   max_new_tokens=rl.max_completion_length, do_sample=True,
                                   temperature=rl.temperature, top_p=rl.top_p, stop=list(cfg.generation.stop),
                                   device=device, generate_kwargs=gen_kwargs, share_prompts=share,
                                   decoder=cfg.generation.decoder)
    t_gen = time.perf_counter() - t0

    ids = [_completion_ids(g, tokenizer) for g in gens]
    n, width = len(ids), max(1, max(len(r) for r in ids))
    completion_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(ids):
        completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        completion_mask[i, : len(r)] = True
    truncated = torch.tensor([g.stop_reason == "length" for g in gens], dtype=torch.bool)
    enc = encode_prompts(tokenizer, row_prompts, torch.device("cpu"))
    input_ids = torch.cat([enc["input_ids"], completion_ids], dim=1).to(device)
    attention_mask = torch.cat([enc["attention_mask"], completion_mask.long()], dim=1).to(device)
    loss_mask = rl_loss_mask(kernel, completion_ids, completion_mask, tokenizer,
                             truncated if rl.mask_truncated_completions else None)

    lengths = completion_mask.sum(1)
    extras = {"completion_ids": ids, "completion_lengths": lengths.tolist(), "truncated": truncated.tolist(),
              "tokenizer": tokenizer, "prompts": row_prompts, "tasks": [kernel.task_of(e) for e in row_examples],
              "config": cfg}
    per_func = compute_rewards(kernel, [g.text for g in gens], row_examples, extras)
    weights = torch.tensor(list(rl.rewards.values()), dtype=torch.float32)
    rewards = total_reward(per_func, weights)
    advantages = group_advantages(rewards, G, rl.scale_rewards)

    rollout = Rollout(input_ids, attention_mask, completion_mask.to(device), loss_mask.to(device),
                      advantages.to(device))
    if rl.num_iterations > 1 or rl.beta > 0:
        logprobs = logprobs or LogProbs(kernel, model)
        olds, refs = [], []
        for rows in micro_batch_rows(n, tc.grad_accum):
            mb = rollout.micro_batch(rows)
            pad = width - mb["width"]
            if rl.num_iterations > 1:
                olds.append(torch.nn.functional.pad(logprobs.no_grad(model, mb, device), (0, pad)))
            if rl.beta > 0:
                refs.append(torch.nn.functional.pad(_reference_logps(logprobs, model, ref_model, mb, device),
                                                    (0, pad)))
        rollout.old_logps = torch.cat(olds) if olds else None
        rollout.ref_logps = torch.cat(refs) if refs else None

    names = list(rl.rewards)
    std = group_std(rewards, G, rl.scale_rewards)
    stats = {"rl/reward/mean": _f(torch.nanmean(rewards)), "rl/reward/std": _f(nanstd(rewards)),
             "rl/frac_reward_zero_std": _f(torch.isclose(std, torch.zeros_like(std)).float().mean())}
    for j, name in enumerate(names):
        stats[f"rl/reward/{name}/mean"] = _f(torch.nanmean(per_func[:, j]))
        stats[f"rl/reward/{name}/std"] = _f(nanstd(per_func[:, j]))
    stats.update({"rl/advantage/mean": _f(advantages.mean()), "rl/advantage/std": _f(advantages.std()),
                  "rl/advantage/min": _f(advantages.min()), "rl/advantage/max": _f(advantages.max()),
                  "rl/prompt_length/mean": _f(enc["attention_mask"].sum(1).float().mean()),
                  "rl/completion_length/mean": _f(lengths.float().mean()),
                  "rl/completion_length/min": int(lengths.min()), "rl/completion_length/max": int(lengths.max()),
                  "rl/truncated_frac": _f(truncated.float().mean()),
                  "rl/loss_tokens": _f(loss_mask.sum(1).float().mean()),
                  "rl/time/generate_s": t_gen, "rl/time/rollout_s": time.perf_counter() - t0})
    rollout.stats = stats
    return rollout


def _reference_logps(logprobs: LogProbs, model, ref_model, mb: dict, device) -> torch.Tensor:
    if ref_model is not None:
        return logprobs.no_grad(ref_model, mb, device)
    with model.disable_adapter():  # PEFT: the base model is the reference
        return logprobs.no_grad(model, mb, device)


def _f(x: torch.Tensor) -> float:
    return float(x.detach().float())


# ------------------------------------------------------------------------------------------ setup
def check_rl_config(kernel) -> None:
    """One-line ConfigErrors for what pydantic cannot check (registry names, divisibility)."""
    cfg, src = kernel.config, kernel.source
    rl, tc = cfg.rl, cfg.train
    if not rl.rewards:
        raise ConfigError(f"{src}: rl.rewards: no reward functions configured for train.algorithm: grpo "
                          f"(e.g. rl.rewards: {{task_score: 1.0}}; registered: {', '.join(kernel.rewards.names())})")
    for name in rl.rewards:
        if name not in kernel.rewards:
            raise ConfigError(f"{src}: rl.rewards.{name}: unknown reward (registered: "
                              f"{', '.join(kernel.rewards.names()) or 'none'})")
    if "format" in rl.rewards and kernel.rewards.owner("format") == "builtin" and rl.format_pattern is None:
        raise ConfigError(f"{src}: rl.format_pattern: the format reward needs a regular expression")
    n = tc.batch_size * rl.num_generations
    if n % tc.grad_accum:
        raise ConfigError(f"{src}: train.grad_accum: {tc.grad_accum} does not divide the {n} completions of a step "
                          f"(train.batch_size {tc.batch_size} x rl.num_generations {rl.num_generations})")
    for line in objective_notes(rl):
        print(f"[metareason] {line}", file=sys.stderr)


def objective_notes(rl) -> list[str]:
    """TRL's warnings on objective settings that run but are not the published method's."""
    notes = []
    level = rl.importance_sampling_level
    if rl.loss_type == "luspo" and level != "sequence":
        notes.append("rl.loss_type: luspo is defined with rl.importance_sampling_level: sequence (the LUSPO paper); "
                     "running it at the token level")
    if rl.loss_type == "vespo" and level != "token":
        notes.append("rl.importance_sampling_level: vespo computes its own sequence weight; sequence only changes "
                     "the ratio of the KL term")
    if level == "sequence" and rl.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        notes.append(f"rl.importance_sampling_level: sequence with loss_type {rl.loss_type} sums token terms, so each "
                     f"sequence weighs by its length; GSPO is loss_type grpo")
    if rl.loss_type == "cispo" and rl.epsilon_high is None:
        notes.append(f"rl.epsilon_high: cispo caps the ratio at epsilon_high, unset here, so at epsilon "
                     f"({rl.epsilon}) as in TRL; the ScaleRL paper uses 5.0")
    return notes


def build_reference(model) -> Optional[torch.nn.Module]:
    """A frozen copy of the starting policy (``None`` for a PEFT model: its base is the reference)."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return None
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# ------------------------------------------------------------------------------------------- loop
def train_grpo(kernel, resume: bool = False, sampler=None, overwrite: bool = False) -> dict:
    """``sampler``: who samples the rollouts (see :func:`generate_rollout`); ``None``: this process."""
    cfg = kernel.config
    tc, rl = cfg.train, cfg.rl
    check_rl_config(kernel)
    examples = load_train_examples(kernel)
    run_dir = prepare_run_dir(kernel, resume, overwrite)
    seed_everything(tc.seed)
    model, tokenizer = kernel.load()
    device = next(model.parameters()).device
    ref_model = build_reference(model) if rl.beta > 0 else None
    try:
        stream = PromptStream(examples, tc.batch_size, tc.seed)
    except ValueError as exc:
        raise ConfigError(f"{kernel.source}: data.train: {exc}") from None
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    logprobs = LogProbs(kernel, model)
    print(f"[metareason] {logprobs.fused_line}", file=sys.stderr)
    # after the reference model's copy: only the policy's gradient forward is patched
    print(f"[metareason] {lean_activations_mode(tc.lean_activations, model)[1]}", file=sys.stderr)
    logprobs.decide(model, tokenizer, [kernel.prompt_text(e, tokenizer) for e in examples[:2]], device)

    rollout: Optional[Rollout] = None

    def save(step: int) -> Path:
        return _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, run.state, rollout)

    run = RunDriver(kernel, run_dir, model, tokenizer, "grpo", save)
    if resume:
        state = run.resume(optimizer, scheduler)
        stream.position = int(state["data_position"])
        if run.step % rl.num_iterations:
            rollout = Rollout.load(run.last_ckpt, state.get("rollout_stats", {}), device)
    run.start(resume)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        while run.step < tc.max_steps:
            step = run.step
            model.train()
            if step % rl.num_iterations == 0:
                rollout = generate_rollout(kernel, model, tokenizer, stream.next_batch(), ref_model, logprobs,
                                           sampler=sampler, version=step)
            assert rollout is not None
            t_train = time.perf_counter()
            step_metrics = _optimizer_step(kernel, model, rollout, logprobs, trainable, optimizer, scheduler, step,
                                           run.last_ckpt, device)
            metrics = dict(rollout.stats)
            metrics.update(step_metrics)
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/epoch": stream.epoch,
                            "rl/time/train_s": time.perf_counter() - t_train})
            run.step_done(int(rollout.attention_mask.sum()), metrics, _describe)
            run.after_step()
    finally:
        run.close_bar()
        unpatch(model)
    return run.finish()


def _describe(m: dict) -> tuple[dict, str]:
    line = (f"reward {m['rl/reward/mean']:.4f} loss {m['train/loss']:.4f} "
            f"len {m['rl/completion_length/mean']:.1f} tok/s {m['train/tokens_per_s']:.0f}")
    return {"reward": f"{m['rl/reward/mean']:.3f}", "loss": f"{m['train/loss']:.4f}"}, line


def _optimizer_step(kernel, model, rollout: Rollout, logprobs: LogProbs, trainable, optimizer, scheduler,
                    step: int, last_ckpt: Optional[Path], device) -> dict[str, float]:
    """``grad_accum`` micro-batches over the rollout, clip, optimizer and scheduler step."""
    tc, rl = kernel.config.train, kernel.config.rl
    total_loss = 0.0
    sums: dict[str, float] = {}
    term_sums: dict[str, float] = {}
    num_items = rollout.num_items
    for rows in micro_batch_rows(rollout.input_ids.shape[0], tc.grad_accum):
        mb = rollout.micro_batch(rows)
        # the entropy bonus needs the entropies of the forward that gives the log-probs
        entropies = None
        if rl.entropy_coef != 0.0:
            logps, entropies = logprobs(model, mb, device, return_entropy=True)
            entropies = entropies.float()
        else:
            logps = logprobs(model, mb, device)
        loss, stats = grpo_loss(logps.float(), mb["old_logps"], mb["ref_logps"], mb["advantages"], mb["loss_mask"],
                                epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, beta=rl.beta,
                                loss_type=rl.loss_type, max_completion_length=rl.max_completion_length,
                                num_items=num_items, grad_accum=tc.grad_accum,
                                kl_bias_correction=rl.kl_bias_correction,
                                importance_sampling_level=rl.importance_sampling_level,
                                entropies=entropies, entropy_coef=rl.entropy_coef,
                                sapo_temperature_pos=rl.sapo_temperature_pos,
                                sapo_temperature_neg=rl.sapo_temperature_neg,
                                vespo_k_pos=rl.vespo_k_pos, vespo_lambda_pos=rl.vespo_lambda_pos,
                                vespo_k_neg=rl.vespo_k_neg, vespo_lambda_neg=rl.vespo_lambda_neg)
        # Plugins' named loss terms, as in the SFT loop; the policy loss above is already scaled
        # per micro-batch, so each term is too (its step value is the micro-batch mean).
        outputs = SimpleNamespace(logps=logps, logits=None)
        hook_batch = dict(mb, completion_ids=mb["input_ids"][:, -mb["width"]:], rl=True)
        for name, (weight, term) in collect_extra_losses(kernel, model, hook_batch, outputs, step).items():
            loss = loss + weight * term / tc.grad_accum
            term_sums[name] = term_sums.get(name, 0.0) + float(term.detach()) / tc.grad_accum
        check_finite(loss, step, last_ckpt)
        loss.backward()
        total_loss += float(loss.detach())
        tokens = float(stats["tokens"])
        for name, value in stats.items():
            if name not in ("tokens", "policy_loss"):  # clip ratios, kl, entropy, ...: token-weighted
                sums[name] = sums.get(name, 0.0) + float(value) * tokens
        sums["_tokens"] = sums.get("_tokens", 0.0) + tokens
    grad_norm = None
    if tc.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = max(sums.pop("_tokens"), 1.0)
    metrics = {"train/loss": total_loss, "rl/iteration": step % rl.num_iterations}
    metrics.update({f"rl/{k}": v / tokens for k, v in sums.items()})
    metrics.update({f"train/{k}": v for k, v in term_sums.items()})
    if grad_norm is not None:
        metrics["train/grad_norm"] = grad_norm
    return metrics


def _save(kernel, run_dir, step, model, tokenizer, optimizer, scheduler, stream, state,
          rollout: Optional[Rollout]) -> Path:
    trainer_state = dict(state, data_position=stream.position)
    mid_generation = rollout is not None and step % kernel.config.rl.num_iterations != 0
    if mid_generation:
        trainer_state["rollout_stats"] = rollout.stats
    path = save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, trainer_state,
                           kernel.config.train.keep_last, write_extra=rollout.save if mid_generation else None)
    kernel.pm.hook.metareason_on_checkpoint(kernel=kernel, step=step, path=str(path))
    return path
