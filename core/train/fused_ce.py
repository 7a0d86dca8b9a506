"""The training loops' use of the fused linear cross-entropy op (:mod:`metareason.ops.linear_ce`).

A causal LM is split into its decoder (final hidden states) and its output layer; the loops
call the decoder and hand the hidden states and the output weight to the fused op, so no
``[tokens, vocab]`` logits exist unless a hook asks for them:

* SFT (``train.fused_ce``): :func:`hidden_forward` returns :class:`HiddenOutputs`, whose
  ``logits`` are computed from the hidden states on first access (through the model's own
  output layer, under the forward's autocast state: the values and gradients the model's
  forward gives), so an extra-loss hook that reads ``outputs.logits`` (mcft's format term)
  still gets them; :func:`fused_token_loss` is :func:`metareason.train.sft.token_loss` on the
  hidden states. With ``auto`` the SFT loop turns the fusion off for the rest of the run once a
  hook has read the logits (they exist then anyway, and the op would only add work).
* GRPO: :class:`HiddenStatesLM` calls like the causal LM (``logits_to_keep``, cache
  arguments) but returns the final hidden states as ``.logits``; ``completion_logps`` /
  ``shared_prompt_logps`` given ``head=`` pass them to :func:`metareason.ops.linear_ce.linear_token_logps`.

Supported: transformers' own causal-LM classes (a model class of our own may attach outputs
in its forward, e.g. ``deepseek_mla``'s ``lru_stats``, which the decoder alone would drop),
PEFT-wrapped ones (LoRA in the decoder; LoRA on the output layer is merged into its weight
per call, differentiably, unless it has dropout or a variant such as DoRA; ``modules_to_save``
heads; trainable token rows, the base weight with the rows written over it), tied or untied
output layers, with or without bias. Refused: prompt-learning adapters,
quantized or otherwise non-``Linear`` output layers, models whose forward transforms the
logits (soft-capping, scaling: a config attribute, and a probe comparing the split against the
model's own logits).
"""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from metareason.config import ConfigError
from metareason.data.tokenize import IGNORE_INDEX

# config attributes of logit transforms a causal LM's forward applies after its output layer
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
STATE_KEY = "fused_ce_off"  # trainer state: the step at which ``auto`` turned the fusion off


class NotFusable(Exception):
    """This model's output layer / forward cannot be split for the fused op (the reason)."""


def shifted_labels(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Labels shifted left (position i is scored on token i + 1; the last on nothing) and the
    number of positions scored."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted, int((shifted != IGNORE_INDEX).sum())


def _base_model(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        active = getattr(model, "active_peft_config", None)
        if active is not None and getattr(active, "is_prompt_learning", False):
            raise NotFusable("a PEFT prompt-learning adapter (its forward adds virtual tokens)")
        return model.get_base_model()
    return model


def _lora_merged(head) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of a PEFT LoRA ``Linear`` as one linear map, differentiable in A and B."""
    weight, bias = _linear(head.base_layer)
    if head.disable_adapters or head.merged:
        return weight, bias
    parts, extra_bias = [], []
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
            raise NotFusable(f"the output layer's LoRA adapter {name!r} is a variant (e.g. DoRA)")
        drop = head.lora_dropout[name]
        if not isinstance(drop, torch.nn.Identity) and not (isinstance(drop, torch.nn.Dropout) and drop.p == 0):
            raise NotFusable(f"the output layer's LoRA adapter {name!r} has dropout (not a linear map in training)")
        a, b = head.lora_A[name], head.lora_B[name]
        if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None:
            raise NotFusable(f"the output layer's LoRA adapter {name!r} is not a pair of Linear layers")
        scale = head.scaling[name]
        with torch.autocast(weight.device.type, enabled=False):
            parts.append((b.weight @ a.weight).to(weight.dtype) * scale)
        if b.bias is not None:
            extra_bias.append(b.bias.to(weight.dtype) * scale)
    for p in parts:
        weight = weight + p
    for eb in extra_bias:
        bias = eb if bias is None else bias + eb
    return weight, bias


def _linear(head) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLinear = ModulesToSaveWrapper = ()
    if ModulesToSaveWrapper and isinstance(head, ModulesToSaveWrapper):
        active = list(head.active_adapters)
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            return _linear(head.original_module)
        return _linear(head.modules_to_save[active[0]])
    if LoraLinear and isinstance(head, LoraLinear) and type(head.base_layer) is torch.nn.Linear:
        return _lora_merged(head)
    tokens = _trainable_token_rows(head)
    if tokens is not None:
        return tokens
    raise NotFusable(f"the output layer is a {type(head).__name__}, not a Linear (or LoRA on one)")


def _trainable_token_rows(head) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """An output layer wrapped by peft's trainable token rows (``trainable_token_indices``, tied or
    not): the base weight with the trained rows written over it, differentiably (what the wrapper's
    own forward multiplies by); None for any other layer."""
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:  # pragma: no cover - older peft
        return None
    if not isinstance(head, TrainableTokensWrapper):
        return None
    layer = head.token_adapter
    base = layer.base_layer
    if type(base) is not torch.nn.Linear:
        raise NotFusable(f"the output layer's trainable token rows wrap a {type(base).__name__}, not a Linear")
    active = list(layer.active_adapters)
    if head.disable_adapters or layer.disable_adapters or layer.merged or not active:
        return base.weight, base.bias
    if base.bias is not None:  # peft's forward of the wrapped Linear drops the bias: not ours to guess
        raise NotFusable("the output layer has a bias and trainable token rows")
    return layer.get_merged_weights(active), None


class HeadSplit:
    """A causal LM as decoder (final hidden states) + output layer."""

    def __init__(self, model):
        base = _base_model(model)
        module = type(base).__module__
        if not module.startswith("transformers.models."):
            raise NotFusable(f"{type(base).__name__} is not one of transformers' model classes (its forward may "
                             "attach outputs of its own)")
        config = getattr(base, "config", None)
        for name in LOGIT_TRANSFORMS:
            value = getattr(config, name, None)
            if value not in (None, 0, 1, 1.0, False):
                raise NotFusable(f"its forward transforms the logits (config.{name} = {value})")
        self.decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        self.head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if self.decoder is None or self.decoder is base or self.head is None:
            raise NotFusable(f"{type(base).__name__} has no separate decoder and output layer")
        self.config = config
        _linear(self.head)  # raises NotFusable for a head the op cannot take

    def weight_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The output layer's weight and bias as of now (LoRA merged, adapters enabled or not)."""
        return _linear(self.head)


class HiddenOutputs:
    """The decoder's outputs as the loops read a causal LM's: ``hidden`` (final hidden states)
    and ``logits`` computed from them on first access (``logits_read`` says whether a reader
    did); any other attribute is the decoder output's own."""

    def __init__(self, outputs, split: HeadSplit):
        self._outputs, self.split = outputs, split
        self.hidden = outputs.last_hidden_state
        dev = self.hidden.device.type
        self._autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev)
        self._logits = None
        self.logits_read = False

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            enabled, dtype, dev = self._autocast
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                self._logits = self.split.head(self.hidden)
            self.logits_read = True
        return self._logits

    def __getattr__(self, name):
        return getattr(self._outputs, name)

    def __getitem__(self, key):
        return self.logits if key == "logits" else self._outputs[key]


def hidden_forward(model, **kwargs) -> HiddenOutputs:
    """The model's forward up to its final hidden states (``kwargs`` as for the causal LM)."""
    split = HeadSplit(model)
    return HiddenOutputs(split.decoder(**kwargs), split)


def fused_token_loss(outputs: HiddenOutputs, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """:func:`metareason.train.sft.token_loss` from the hidden states: the same labels shifted
    left, the same sum over non-ignored positions divided by ``max(n, 1)``; call it under the
    forward's autocast state."""
    from metareason.ops.linear_ce import linear_cross_entropy

    shifted, n = shifted_labels(labels)
    weight, bias = outputs.split.weight_bias()
    loss = linear_cross_entropy(outputs.hidden, weight, shifted, bias, reduction="sum")
    return loss / max(n, 1), n


class HiddenStatesLM:
    """Called like the causal LM (``input_ids``, ``logits_to_keep``, attention / position /
    cache arguments) but returns the decoder's final hidden states as ``.logits`` (the last
    ``logits_to_keep`` positions), for the GRPO log-prob functions given ``head=``."""

    def __init__(self, model):
        self.split = HeadSplit(model)
        self.config = self.split.config

    def __call__(self, input_ids=None, logits_to_keep: int = 0, **kwargs):
        out = self.split.decoder(input_ids=input_ids, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -int(logits_to_keep):]
        return SimpleNamespace(logits=h, last_hidden_state=out.last_hidden_state)

    def token_logps(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_tokens: Optional[int] = None, return_entropy: bool = False):
        """:func:`metareason.train.grpo_loss.token_logps` from hidden states (fused; its
        ``chunk_tokens`` is for logits rows and is not used: the op sizes its chunks by the vocabulary)."""
        from metareason.ops.linear_ce import linear_token_logps

        weight, bias = self.split.weight_bias()
        return linear_token_logps(hidden, weight, targets, bias, temperature=temperature,
                                  return_entropy=return_entropy)


# ------------------------------------------------------------------------------- the switch
@torch.no_grad()
def probe(model) -> Optional[str]:
    """Why the split does not reproduce the model's logits on a short probe input (None: it does).

    Runs in training mode, the loops' (an eval-mode forward is not side-effect free everywhere:
    bitsandbytes repacks 4-bit weights for CPU inference on its first one), both forwards from
    the same RNG state, so dropout draws the same masks."""
    split = HeadSplit(model)
    device = next(model.parameters()).device
    vocab = split.weight_bias()[0].shape[0]
    ids = (torch.arange(12, device=device) * 7 % vocab).unsqueeze(0)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            ref = model(input_ids=ids, use_cache=False).logits.float()
            torch.manual_seed(0)
            weight, bias = split.weight_bias()
            mine = F.linear(split.decoder(input_ids=ids, use_cache=False).last_hidden_state, weight, bias).float()
    except Exception as exc:  # noqa: BLE001 - a model the split cannot call is one it cannot fuse
        return f"the probe forward failed: {type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    if ref.shape != mine.shape:
        return f"the split gives logits of shape {tuple(mine.shape)}, the model {tuple(ref.shape)}"
    full = all(p.dtype == torch.float32 for p in model.parameters())
    scale = float(ref.abs().max()) + 1.0
    diff = float((ref - mine).abs().max())
    if diff > (1e-4 if full else 2e-2) * scale:
        return f"the split's logits differ from the model's by {diff:.2e}"
    return None


def fused_ce_mode(setting, model) -> tuple[bool, str]:
    """``train.fused_ce`` resolved for this model: (on, a line saying why)."""
    label = f"train.fused_ce={str(setting).lower()}"
    if setting is False:
        return False, f"{label}: off"
    try:
        HeadSplit(model)
        why = probe(model)
    except NotFusable as exc:
        why = str(exc)
    if why is not None:
        if setting is True:
            raise ConfigError(f"train.fused_ce: true, but this model's output layer cannot be fused ({why}); "
                              "set train.fused_ce: auto or false")
        return False, f"{label}: off ({why})"
    return True, f"{label}: on (output layer and token loss fused, no [tokens, vocab] logits)"


def announce(line: str) -> None:
    print(f"[metareason] {line}", file=sys.stderr)


__all__ = ["HeadSplit", "HiddenOutputs", "HiddenStatesLM", "NotFusable", "fused_ce_mode", "fused_token_loss",
           "hidden_forward", "probe", "STATE_KEY"]
