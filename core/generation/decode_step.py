"""One decode step of a Llama-family model without the module plumbing around its arithmetic.

After the prefill, every new token costs a full ``model(...)`` call: keyword plumbing and
output-capture decorators, a causal mask built by ``create_causal_mask``, ``Cache.update``
dispatch, output dataclasses, and a ``Module.__call__`` per norm, attention, MLP and decoder
layer. For the small models this project trains on a CPU that is about a third of the decode
time (``metareason bench grpo``), and on a GPU it is launch-bound Python for any model at
small batch. :class:`DecodeStep` runs the same tensor operations in the same order, so the
logits are bit-identical to the model's forward (tests/test_decode_step.py compares them, and
the tokens against ``generate``):

* the embedding, every projection (``q/k/v/o``, ``gate/up/down``, ``lm_head``) and the rotary
  embedding are called as the model's own modules (a LoRA or quantised linear, a trainable-token
  embedding and a scaled RoPE run their own code), or as ``F.linear`` on the module's weight
  when it is a plain ``nn.Linear`` without hooks (what ``nn.Linear.forward`` does);
* RMSNorm, the gated MLP, RoPE application and the residuals are written out as in the
  model's code; attention goes through the attention function the model itself would call
  (``sdpa``) with the mask ``create_causal_mask`` gives a one-token step: ``None`` without
  padding, else the boolean key-padding mask ``[B, 1, 1, K]``;
* keys and values go into the buffers of :mod:`metareason.generation.decode`'s growing cache layers.

:meth:`DecodeStep.build` returns ``None`` (the loop then calls the model) unless every module
on that path is exactly the family's own class from ``transformers`` (``llama``, ``qwen2``,
``qwen3``, ``mistral``), the model runs ``sdpa`` attention with no sliding window, and no
module it bypasses carries a forward hook or a patched ``forward`` (e.g. accelerate offload;
``train.lean_activations``' patch is not one: without gradients it is the module's own forward).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

#: model_type -> class-name prefix in transformers.models.<type>.modeling_<type>
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}


def _family_classes(model_type: str) -> Optional[dict]:
    prefix = FAMILIES.get(model_type)
    if prefix is None:
        return None
    try:
        mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        names = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
        classes = {n: getattr(mod, prefix + n) for n in names}
        classes["apply_rotary_pos_emb"] = mod.apply_rotary_pos_emb
    except (ImportError, AttributeError):
        return None
    return classes


def _hooked(module: torch.nn.Module) -> bool:
    from metareason.train.lean_act import own_forward_without_grad

    # train.lean_activations' patch runs the module's own forward without gradients: not a hook here
    patched = "forward" in module.__dict__ and not own_forward_without_grad(module)
    return bool(module._forward_hooks or module._forward_pre_hooks or patched)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


def _linear(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``nn.Linear.forward`` itself for a plain linear; the module's own call for anything else."""
    if type(module) is torch.nn.Linear and not _hooked(module):
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _rms_norm(module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``LlamaRMSNorm.forward`` (the same in the other families)."""
    weight, eps = module.weight, module.variance_epsilon

    def norm(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + eps)
        return weight * x.to(dtype)
    return norm


class _Layer:
    __slots__ = ("attn", "norm1", "q", "k", "v", "o", "q_norm", "k_norm", "norm2", "gate", "up", "down", "act",
                 "head_dim")

    def __init__(self, layer, classes: dict):
        a = layer.self_attn
        self.attn, self.head_dim = a, a.head_dim
        self.norm1, self.norm2 = _rms_norm(layer.input_layernorm), _rms_norm(layer.post_attention_layernorm)
        self.q, self.k, self.v, self.o = _linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj), _linear(a.o_proj)
        self.q_norm = _rms_norm(a.q_norm) if hasattr(a, "q_norm") else None  # qwen3
        self.k_norm = _rms_norm(a.k_norm) if hasattr(a, "k_norm") else None
        mlp = layer.mlp
        self.gate, self.up, self.down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
        self.act = mlp.act_fn


class DecodeStep:
    """``step(ids [B, 1], cache, position_ids [B, 1], mask [B, K] or None) -> logits [B, 1, V]``,
    equal to ``model(input_ids=ids, cache=cache, position_ids=..., attention_mask=mask,
    logits_to_keep=1).logits`` (see the module docstring)."""

    def __init__(self, model, classes: dict):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        inner = model.model
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.layers = [_Layer(layer, classes) for layer in inner.layers[: model.config.num_hidden_layers]]
        self.norm = _rms_norm(inner.norm)
        self.head = _linear(model.lm_head)
        self.rope = classes["apply_rotary_pos_emb"]
        self.attention = ALL_ATTENTION_FUNCTIONS["sdpa"]

    @classmethod
    def build(cls, model) -> Optional["DecodeStep"]:
        """The step for ``model`` (a :func:`metareason.generation.decode.decoder_model`), or ``None`` when
        its forward is not exactly its family's (see the module docstring)."""
        config = getattr(model, "config", None)
        classes = _family_classes(getattr(config, "model_type", None))
        if classes is None or type(model) is not classes["ForCausalLM"] or _global_hooks():
            return None
        if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "use_sliding_window", False) \
                or getattr(config, "sliding_window", None) is not None and not getattr(config, "layer_types", None) \
                or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            return None  # a sliding window lives in the mask create_causal_mask would build
        inner = getattr(model, "model", None)
        if type(inner) is not classes["Model"] or type(inner.norm) is not classes["RMSNorm"] \
                or type(inner.rotary_emb) is not classes["RotaryEmbedding"]:
            return None
        bypassed = [model, inner, inner.norm]
        for layer in inner.layers[: config.num_hidden_layers]:
            a = layer.self_attn
            if type(layer) is not classes["DecoderLayer"] or type(a) is not classes["Attention"] \
                    or type(layer.mlp) is not classes["MLP"] or getattr(a, "sliding_window", None) is not None:
                return None
            norms = [layer.input_layernorm, layer.post_attention_layernorm] + \
                [getattr(a, n) for n in ("q_norm", "k_norm") if hasattr(a, n)]
            if any(type(n) is not classes["RMSNorm"] for n in norms):
                return None
            bypassed += [layer, a, layer.mlp, *norms]
        if any(_hooked(m) for m in bypassed):
            return None
        return cls(model, classes)

    def __call__(self, ids: torch.Tensor, cache, position_ids: torch.Tensor,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids)
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        B, L = ids.shape
        for i, layer in enumerate(self.layers):
            shape = (B, L, -1, layer.head_dim)
            x = layer.norm1(h)
            q, k = layer.q(x).view(shape), layer.k(x).view(shape)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = layer.v(x).view(shape).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            k, v = cache.layers[i].update(k, v)
            out, _ = self.attention(layer.attn, q, k, v, attn_mask, dropout=0.0, scaling=layer.attn.scaling)
            h = h + layer.o(out.reshape(B, L, -1).contiguous())
            x = layer.norm2(h)
            h = h + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        h = self.norm(h)
        return self.head(h[:, -1:, :])
