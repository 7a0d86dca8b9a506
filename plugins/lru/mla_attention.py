"""Multi-head Latent Attention (DeepSeek-V2/V3) with the LRU on the KV latent.

    x ──W_DKV──> c_kv [B,S,d_c] ──RMSNorm──> LRU ──> c_kv' ──W_UK──> k_nope (per head)
      │                                              └────W_UV──> v      (per head)
      ├──W_KR──> k_rope [B,S,d_r] (RoPE; one key shared by all heads)
      └──W_DQ──> c_q ──RMSNorm──W_UQ──> q = [q_nope | q_rope (RoPE)] (per head)
    attention(q, [k_nope | k_rope], v), causal ──W_O──> output

The cache holds, per layer, only the refined latent ``c_kv'`` and the rotated ``k_rope``, so a
decoding step runs the LRU on the new token only. With a cache, attention runs in the
*absorbed* form: ``q_nope·W_UK`` is a query in latent space, scores are taken against the
cached latents directly and values are up-projected once after the weighted sum, so cached
keys and values are never decompressed.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from metareason.plugins.lru.cache import PagedLatentCache, cache_length, update_latent_cache
from metareason.plugins.lru.chain import build_lru
from metareason.plugins.lru.config import DeepSeekMLAConfig, MLAConfig
from metareason.plugins.lru.lru import LRUOutput
from metareason.plugins.lru.rope import apply_rope, rope_cos_sin


class MLARMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_attention_mask(attention_mask: Optional[torch.Tensor], q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Boolean ``[B|1, 1, q_len, past_len + q_len]``: causal, padding keys masked.

    A query always sees its own position, so a padding query (left padding) has one key and
    its softmax stays finite; real tokens never see padding keys.
    """
    total = past_len + q_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        keys = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        if keys.shape[1] != total:
            raise ValueError(f"attention_mask: covers {keys.shape[1]} positions, expected {total}")
        allowed = allowed & keys[:, None, None, :]
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


class MLAAttention(nn.Module):
    """``MLAAttention(config, layer_idx)(hidden_states, position_ids=...) -> (output, attn_weights, past_kv)``.

    ``config``: an :class:`MLAConfig` (or a ``DeepSeekMLAConfig``, from which the layer's
    ``MLAConfig`` is derived). ``past_kv`` is the cache object when one was passed, else the
    tuple ``(refined_latent [B,T,d_c], k_rope [B,T,d_r])`` of every position so far; pass it
    back as ``past_key_values`` to decode the next tokens.
    ``attn_weights`` is ``None`` unless ``output_attentions=True``.
    """

    def __init__(self, config: Union[MLAConfig, DeepSeekMLAConfig], layer_idx: int = 0):
        super().__init__()
        if isinstance(config, DeepSeekMLAConfig):
            config = config.mla_config(layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        c = config
        H, d_c = c.num_attention_heads, c.kv_latent_dim
        self.num_heads = H
        if c.q_latent_dim:
            self.W_DQ = nn.Linear(c.hidden_size, c.q_latent_dim, bias=c.attention_bias)
            self.q_norm = MLARMSNorm(c.q_latent_dim, c.rms_norm_eps)
            self.W_UQ = nn.Linear(c.q_latent_dim, H * c.qk_head_dim, bias=False)
        else:
            self.W_Q = nn.Linear(c.hidden_size, H * c.qk_head_dim, bias=c.attention_bias)
        self.W_DKV = nn.Linear(c.hidden_size, d_c, bias=c.attention_bias)
        self.kv_norm = MLARMSNorm(d_c, c.rms_norm_eps)
        self.W_KR = nn.Linear(c.hidden_size, c.rope_head_dim, bias=c.attention_bias)
        self.lru = build_lru(c.lru) if c.use_lru else None  # group E: the cross-reading LRU
        self.W_UK = nn.Linear(d_c, H * c.nope_head_dim, bias=False)
        self.W_UV = nn.Linear(d_c, H * c.v_head_dim, bias=False)
        self.W_O = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    # ---------------------------------------------------------------------------- pieces
    def queries(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        q = self.W_UQ(self.q_norm(self.W_DQ(x))) if c.q_latent_dim else self.W_Q(x)
        return q.view(*x.shape[:2], self.num_heads, c.qk_head_dim).transpose(1, 2)  # [B,H,S,dq]

    def latent(self, x: torch.Tensor, **context: Any) -> tuple[torch.Tensor, Optional[LRUOutput]]:
        """``c_kv'``: the normalised down-projection, refined by the LRU when there is one.
        ``context`` (positions, mask, cache) reaches only an LRU that reads other positions."""
        c_kv = self.kv_norm(self.W_DKV(x))
        if self.lru is None:
            return c_kv, None
        if getattr(self.lru, "reads_positions", False):
            return self.lru(c_kv, layer_idx=self.layer_idx, **context)
        return self.lru(c_kv)

    # ---------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, past_key_values: Any = None,
                output_attentions: bool = False, **_: Any):
        out, weights, past_kv, _stats = self.forward_with_stats(hidden_states, position_ids, attention_mask,
                                                                past_key_values, output_attentions)
        return out, weights, past_kv

    def forward_with_stats(self, hidden_states, position_ids=None, attention_mask=None, past_key_values=None,
                           output_attentions=False):
        """``forward`` plus ``(refined_latent, LRUOutput | None)`` for the loss terms and statistics."""
        c = self.config
        B, S, _ = hidden_states.shape
        past_len = cache_length(past_key_values, self.layer_idx)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S, device=hidden_states.device)[None]
        q = self.queries(hidden_states)
        q_nope, q_rope = q.split([c.nope_head_dim, c.rope_head_dim], dim=-1)
        latent, lru_out = self.latent(hidden_states, position_ids=position_ids, attention_mask=attention_mask,
                                      cache=past_key_values)
        cos, sin = rope_cos_sin(position_ids, c.rope_head_dim, c.rope_theta, q.dtype)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(self.W_KR(hidden_states)[:, None], cos, sin)[:, 0]  # [B,S,d_r]

        if isinstance(past_key_values, PagedLatentCache):
            attn = self._paged(past_key_values, past_len, q_nope, q_rope, latent, k_rope, attention_mask)
            out = self.W_O(attn.transpose(1, 2).reshape(B, S, self.num_heads * c.v_head_dim))
            return out, None, past_key_values, (latent, lru_out)
        if past_key_values is not None:
            all_latent, all_k_rope = update_latent_cache(past_key_values, self.layer_idx, latent, k_rope)
            past_kv = (all_latent, all_k_rope) if isinstance(past_key_values, tuple) else past_key_values
        else:
            all_latent, all_k_rope = latent, k_rope
            past_kv = (latent, k_rope)

        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        elif attention_mask is not None or past_len > 0 or output_attentions:
            mask = build_attention_mask(attention_mask, S, past_len, hidden_states.device)
        dropout = c.attention_dropout if self.training else 0.0
        if past_len > 0 and self._can_absorb():
            attn, weights = self._absorbed(q_nope, q_rope, all_latent, all_k_rope, mask, output_attentions, dropout)
        else:
            attn, weights = self._expanded(q_nope, q_rope, all_latent, all_k_rope, mask, output_attentions, dropout)
        out = self.W_O(attn.transpose(1, 2).reshape(B, S, self.num_heads * c.v_head_dim))
        return out, weights, past_kv, (latent, lru_out)

    def _paged(self, cache, past_len, q_nope, q_rope, latent, k_rope, attention_mask):
        """Attention with the paged latent cache: prefill as usual (expanded form, padding masked),
        then only the real tokens are stored; decode steps run ``metareason.ops.mla_decode``."""
        S = latent.shape[1]
        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask: the paged decode cache takes a 2D [B, T] padding mask")
            valid = attention_mask[:, -S:].to(device=latent.device, dtype=torch.bool)
        if past_len == 0:
            cache.append(self.layer_idx, latent, k_rope, valid)
            mask = build_attention_mask(attention_mask, S, 0, latent.device) if attention_mask is not None else None
            dropout = self.config.attention_dropout if self.training else 0.0
            return self._expanded(q_nope, q_rope, latent, k_rope, mask, False, dropout)[0]
        if valid is not None and not bool(valid.all()):
            raise ValueError("attention_mask: new tokens after the prefill must all be real (mask 1) "
                             "with the paged decode cache")
        layer = cache.append(self.layer_idx, latent, k_rope, None)
        # the up-projection matrices, once per cache (one generate() call): a wrapped layer's
        # effective matrix costs a d_c-row forward to extract
        weights = cache.up_weights.get(self.layer_idx) if not torch.is_grad_enabled() else None
        if weights is None:  # with grad enabled, fresh each step (a graph is not reused)
            weights = self._up_weights()
            if not torch.is_grad_enabled():
                cache.up_weights[self.layer_idx] = weights
        return self._latent_decode(q_nope, q_rope, *weights, *layer.tensors())

    def _latent_decode(self, q_nope, q_rope, w_uk, w_uv, kv_cache, block_table, seqlens):
        """``mla_decode`` on absorbed queries ``[q_nope·W_UK_h | q_rope]``, then W_UV per head."""
        from metareason.api import mla_decode

        c = self.config
        q_lat = torch.einsum("bhsn,hnc->bshc", q_nope, w_uk)
        q = torch.cat([q_lat, q_rope.transpose(1, 2).to(q_lat.dtype)], dim=-1).to(kv_cache.dtype).contiguous()
        o_lat, _ = mla_decode(q, kv_cache, block_table, seqlens, c.kv_latent_dim, c.softmax_scale, causal=True)
        return torch.einsum("bshc,hvc->bhsv", o_lat.to(w_uv.dtype), w_uv)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[H, d_nope, d_c]`` and W_UV ``[H, d_v, d_c]`` as matrices. A wrapped layer (LoRA,
        quantised) is linear without bias, so its effective matrix is its output on the identity."""
        c = self.config
        H, d_c = self.num_heads, c.kv_latent_dim

        def matrix(module, width):
            if type(module) is nn.Linear:
                w = module.weight
            else:
                ref = next(p for p in module.parameters() if p.is_floating_point())
                w = module(torch.eye(d_c, dtype=ref.dtype, device=ref.device)).T
            return w.reshape(H, width, d_c)

        return matrix(self.W_UK, c.nope_head_dim), matrix(self.W_UV, c.v_head_dim)

    def _can_absorb(self) -> bool:
        """The absorbed form reads W_UK / W_UV as matrices: only for plain linear layers (a LoRA
        or quantised wrapper goes through the expanded form, which calls the modules)."""
        return type(self.W_UK) is nn.Linear and type(self.W_UV) is nn.Linear

    def _expanded(self, q_nope, q_rope, latent, k_rope, mask, output_attentions, dropout):
        """Keys and values decompressed from the latent, then standard attention (prefill, training)."""
        c = self.config
        B, T = latent.shape[:2]
        H = self.num_heads
        k_nope = self.W_UK(latent).view(B, T, H, c.nope_head_dim).transpose(1, 2)
        v = self.W_UV(latent).view(B, T, H, c.v_head_dim).transpose(1, 2)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, T, c.rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if output_attentions:
            weights = self._softmax((q @ k.transpose(-1, -2)) * c.softmax_scale, mask, dropout)
            return weights @ v, weights
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=c.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=c.softmax_scale)
        return out, None

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask, output_attentions, dropout):
        """Attention in latent space: W_UK folded into the query, W_UV applied after the sum."""
        c = self.config
        H, d_c = self.num_heads, c.kv_latent_dim
        w_uk = self.W_UK.weight.view(H, c.nope_head_dim, d_c)
        w_uv = self.W_UV.weight.view(H, c.v_head_dim, d_c)
        B, _, S, _ = q_nope.shape
        T = latent.shape[1]
        q_lat = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk)
        # Heads folded into rows: [B, H*S, .] @ [B, ., T] (no per-head copy of the cache).
        scores = torch.baddbmm(q_rope.reshape(B, H * S, -1) @ k_rope.transpose(1, 2),
                               q_lat.reshape(B, H * S, d_c), latent.transpose(1, 2))
        scores = (scores * c.softmax_scale).view(B, H, S, T)
        weights = self._softmax(scores, mask, dropout)
        o_lat = torch.bmm(weights.view(B, H * S, T), latent).view(B, H, S, d_c)
        out = torch.einsum("bhsc,hvc->bhsv", o_lat, w_uv)
        return out, (weights if output_attentions else None)

    @staticmethod
    def _softmax(scores, mask, dropout):
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        return F.dropout(weights, p=dropout) if dropout else weights
