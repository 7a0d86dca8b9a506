"""``DeepSeekMLAForCausalLM``: Llama-style pre-norm blocks whose attention is MLA (+ LRU).

A transformers ``PreTrainedModel`` + ``GenerationMixin``: ``save_pretrained`` /
``AutoModelForCausalLM.from_pretrained`` (once the arch is registered, see ``register()``),
``generate()`` with a paged latent cache read by ``metareason.ops.mla_decode`` (``decode_cache:
paged``, the default) or a ``DynamicCache`` holding latents (``decode_cache: dynamic``), see :mod:`.cache`.

    config = DeepSeekMLAConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=24,
                               use_lru=True, lru_max_iterations=8)
    model = DeepSeekMLAForCausalLM(config)
    outputs = model(input_ids, labels=labels)   # loss = L_pred + weighted aux terms, logits
    outputs.lm_loss, outputs.aux_losses, outputs.lru_stats
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from metareason.api import CACHE_KWARG, cache_from_kwargs
from metareason.plugins.lru.cache import ChainDynamicCache, PagedLatentCache
from metareason.plugins.lru.config import DeepSeekMLAConfig
from metareason.plugins.lru.losses import lru_loss_terms, weighted_total
from metareason.plugins.lru.lru import LatentReasoningUnit
from metareason.plugins.lru.mla_attention import MLAAttention, MLARMSNorm
from metareason.plugins.lru.stats import LRUForwardStats, LRULayerStats


@dataclass
class DeepSeekMLAModelOutput(BaseModelOutputWithPast):
    lru_stats: Optional[LRUForwardStats] = None


@dataclass
class DeepSeekMLACausalLMOutput(CausalLMOutputWithPast):
    """``loss`` (with labels) = ``lm_loss`` + Σ weight·``aux_losses[name]``; ``lru_stats`` always."""

    lm_loss: Optional[torch.FloatTensor] = None
    aux_losses: Optional[dict] = None
    lru_stats: Optional[LRUForwardStats] = None


class DeepSeekMLAMLP(nn.Module):
    def __init__(self, config: DeepSeekMLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DeepSeekMLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepSeekMLAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAAttention(config, layer_idx)
        self.mlp = DeepSeekMLAMLP(config)
        self.input_layernorm = MLARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MLARMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_ids=None, attention_mask=None, past_key_values=None,
                output_attentions=False):
        attn, weights, _, (latent, lru_out) = self.self_attn.forward_with_stats(
            self.input_layernorm(hidden_states), position_ids, attention_mask, past_key_values, output_attentions)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights, latent, lru_out


class DeepSeekMLAPreTrainedModel(PreTrainedModel):
    config_class = DeepSeekMLAConfig
    config: DeepSeekMLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepSeekMLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LatentReasoningUnit):
            module.reset_parameters()


class DeepSeekMLAModel(DeepSeekMLAPreTrainedModel):
    def __init__(self, config: DeepSeekMLAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepSeekMLADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MLARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Any = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                cache: Any = None, **kwargs: Any) -> DeepSeekMLAModelOutput:
        # generate() passes the cache as `cache` (transformers >= 5.24) or `past_key_values`
        past_key_values = cache_from_kwargs(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        if use_cache and self.config.decode_cache == "paged" and (
                past_key_values is None or (type(past_key_values) is DynamicCache
                                            and past_key_values.get_seq_length() == 0)):
            past_key_values = PagedLatentCache(self.config.num_hidden_layers)  # replaces generate()'s empty one
        if use_cache and self.config.lru_cross_read and (
                past_key_values is None or (type(past_key_values) is DynamicCache
                                            and past_key_values.get_seq_length() == 0)):
            # group E keeps per-iteration LRU states on the cache: a DynamicCache that reorders them too
            past_key_values = ChainDynamicCache(config=self.config)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        S = inputs_embeds.shape[1]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S, device=inputs_embeds.device)[None]
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -S:].bool()
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: plain causal attention (the fast path)

        stats = LRUForwardStats(token_mask=token_mask)
        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        all_weights = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            hidden, weights, latent, lru_out = layer(hidden, position_ids=position_ids, attention_mask=attention_mask,
                                                     past_key_values=past_key_values,
                                                     output_attentions=output_attentions)
            if lru_out is not None:
                stats.layers.append(LRULayerStats(i, latent, lru_out))
            if output_attentions:
                all_weights.append(weights)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden
        return DeepSeekMLAModelOutput(last_hidden_state=hidden, **{CACHE_KWARG: past_key_values},
                                      hidden_states=tuple(all_hidden) if all_hidden else None,
                                      attentions=tuple(all_weights) if all_weights else None, lru_stats=stats)


class DeepSeekMLAForCausalLM(DeepSeekMLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepSeekMLAConfig):
        super().__init__(config)
        self.model = DeepSeekMLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Any = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, logits_to_keep: int = 0,
                cache: Any = None, **kwargs: Any) -> DeepSeekMLACausalLMOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache_from_kwargs(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = lm_loss = aux = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
            aux = lru_loss_terms(out.lru_stats)
            extra = weighted_total(aux, self.config.lru_loss_weights)
            loss = lm_loss if extra is None else lm_loss + extra
        return DeepSeekMLACausalLMOutput(loss=loss, logits=logits, **{CACHE_KWARG: getattr(out, CACHE_KWARG)},
                                         hidden_states=out.hidden_states, attentions=out.attentions,
                                         lm_loss=lm_loss, aux_losses=aux, lru_stats=out.lru_stats)


def register() -> None:
    """Register ``deepseek_mla`` with transformers' Auto classes (the kernel does this for runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(DeepSeekMLAConfig.model_type, DeepSeekMLAConfig, exist_ok=True)
    AutoModelForCausalLM.register(DeepSeekMLAConfig, DeepSeekMLAForCausalLM, exist_ok=True)
