"""Group E: an LRU whose iterations read other positions (``lru_cross_read: true``).

The plain LRU refines each token's latent alone, so more iterations add per-token depth but
cannot move a value along a causal chain. Here every iteration n first takes a causal
single-head attention read over the iteration-(n−1) states of the positions ``j <= i`` (in
latent space: the values are the states themselves, as in MLA's absorbed attention), and the
read ``m`` enters the GRU update next to the token's own state::

    q_i = rope(W_rq·h_i), k_j = rope(W_rk·h_j)          # read_dim wide, last read_rope_dim rotated
    m_i = Σ_{j<=i, j real} softmax_j(q_i·k_j / √read_dim) h_j
    z, r = σ(W·h + U·x + V·m + b);  h̃ = tanh(W_h(r ⊙ h) + U_h·x + V_h·m + b_h)
    h_n = (1−z) ⊙ h + z ⊙ h̃;  p_n = σ(w_p·h_n + b_p)

All positions update together from the previous iteration's states (a synchronous step), so a
value moves exactly one link along a chain per iteration. Halting is the plain LRU's ACT (same
output mixture, remainder, ponder cost, statistics); a halted token's state stays frozen and is
what later readers see. ``j <= i`` (not ``<``): every query has at least one key (itself), so the
first token and padding queries need no special case, the same convention as the model's
attention (``build_attention_mask``). Position: MLA keeps position out of the latent, so in
layer 0 a content-only read would see the prefix as a bag of tokens; the last ``read_rope_dim``
dimensions of the read's query and key are rotated by RoPE (MLA's decoupled rope key, here on a
slice), the others address by content.

Decoding: a new token's iteration n reads the iteration-(n−1) states of all earlier tokens, so
the cache keeps, per layer, every iteration's state and rotated read key of every position
(:class:`ChainStates`, ``N·(d_c + read_dim)`` numbers per token per layer) next to MLA's latent
cache; a decoding step runs the recurrence on the new tokens only.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from metareason.api import lru_act_compute_dtype as compute_dtype
from metareason.plugins.lru.config import LRUConfig
from metareason.plugins.lru.lru import LatentReasoningUnit, LRUOutput
from metareason.plugins.lru.rope import rope_cos_sin, rotate_half


class ChainStates:
    """Per layer, every iteration's state ``[N, B, T, d]`` and read key ``[N, B, T, k]`` of the
    positions seen so far, plus their validity ``[B, T]`` (False = padding: never read).
    Buffers grow in place (capacity rounded up to 64 rows) so a decoding step copies only its row."""

    def __init__(self):
        self.layers: dict[int, list] = {}  # layer -> [states, keys, valid, length]

    def length(self, layer_idx: int) -> int:
        entry = self.layers.get(layer_idx)
        return 0 if entry is None else entry[3]

    def get(self, layer_idx: int):
        """``(states [N,B,T,d], keys [N,B,T,k], valid [B,T])`` or ``None``."""
        entry = self.layers.get(layer_idx)
        if entry is None:
            return None
        states, keys, valid, n = entry
        return states[:, :, :n], keys[:, :, :n], valid[:, :n]

    def append(self, layer_idx: int, states: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> None:
        states, keys = states.detach(), keys.detach()
        N, B, S, _ = states.shape
        entry = self.layers.get(layer_idx)
        if entry is None:
            entry = self.layers[layer_idx] = [states.new_empty(N, B, 0, states.shape[-1]),
                                              keys.new_empty(N, B, 0, keys.shape[-1]),
                                              valid.new_zeros(B, 0), 0]
        buf_s, buf_k, buf_v, n = entry
        if buf_s.shape[1] != B:
            raise ValueError(f"cache: holds {buf_s.shape[1]} sequences, this step has {B}")
        if n + S > buf_s.shape[2]:
            cap = 64 * math.ceil((n + S) * 1.25 / 64)
            grow = lambda t, dim: torch.cat([t, t.new_zeros(*t.shape[:dim], cap - t.shape[dim], *t.shape[dim + 1:])], dim)
            buf_s, buf_k, buf_v = grow(buf_s, 2), grow(buf_k, 2), grow(buf_v, 1)
        buf_s[:, :, n:n + S] = states
        buf_k[:, :, n:n + S] = keys
        buf_v[:, n:n + S] = valid
        self.layers[layer_idx] = [buf_s, buf_k, buf_v, n + S]

    def select(self, index: torch.Tensor) -> None:
        """Keep / reorder sequences (beam search: sequence b becomes old sequence ``index[b]``)."""
        for layer_idx, (s, k, v, n) in list(self.layers.items()):
            idx = index.to(s.device)
            self.layers[layer_idx] = [s.index_select(1, idx), k.index_select(1, idx), v.index_select(0, idx), n]


def chain_store(cache: Any) -> ChainStates:
    """The :class:`ChainStates` riding on a model cache (created on first use)."""
    if isinstance(cache, tuple):
        raise ValueError("lru_cross_read: a tuple past_key_values cannot hold the per-iteration states; "
                         "pass a cache object (e.g. transformers.DynamicCache)")
    store = getattr(cache, "lru_chain_states", None)
    if store is None:
        store = ChainStates()
        cache.lru_chain_states = store
    return store


def read_mask(attention_mask: Optional[torch.Tensor], S: int, past_valid: Optional[torch.Tensor],
              batch: int, device: torch.device) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(allowed [B|1, S, T] | None, valid of the new tokens [B, S])`` for the read.

    Causal (key ``j <= i``) and padding keys masked; a query always sees itself. ``None`` means
    plain causal over the new tokens only (no past, no padding: the fast path). A 4D mask given to
    the model (``[B, 1, S, T]``, bool or additive) is used as it is, like the attention does.
    """
    past = 0 if past_valid is None else past_valid.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[:, 0, :, -(past + S):]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        return allowed, torch.ones(batch, S, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid = attention_mask[:, -S:].to(device=device, dtype=torch.bool)
    else:
        valid = torch.ones(batch, S, dtype=torch.bool, device=device)
    if past == 0 and bool(valid.all()):
        return None, valid
    keys = valid if past_valid is None else torch.cat([past_valid.to(device), valid], dim=1)
    q_pos = torch.arange(past, past + S, device=device)[:, None]
    k_pos = torch.arange(past + S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None] & keys[:, None, :]
    return allowed | (k_pos == q_pos)[None], valid


class ChainReasoningUnit(LatentReasoningUnit):
    """The LRU plus the cross-position read (parameters ``W_rq``, ``W_rk`` ``[read_dim, d]``;
    ``V [2d, d]``, ``V_h [d, d]``: the read into the gates and into the candidate)."""

    reads_positions = True

    def __init__(self, config: LRUConfig):
        super().__init__(config)
        d, k = config.latent_dim, config.read_dim
        self.W_rq = nn.Parameter(torch.empty(k, d))
        self.W_rk = nn.Parameter(torch.empty(k, d))
        self.V = nn.Parameter(torch.empty(2 * d, d))
        self.V_h = nn.Parameter(torch.empty(d, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The LRU's initialisation, and the read's weights ~ U(±gain/√d) like the LRU's."""
        super().reset_parameters()
        if not hasattr(self, "V_h"):  # called by LatentReasoningUnit.__init__ before the read exists
            return
        bound = self.config.init_gain / math.sqrt(self.config.latent_dim)
        with torch.no_grad():
            for w in (self.W_rq, self.W_rk, self.V, self.V_h):
                init.uniform_(w, -bound, bound)

    def forward(self, latent: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cache: Any = None,
                layer_idx: int = 0) -> tuple[torch.Tensor, LRUOutput]:
        """``latent [B, S, d]`` (the new tokens); ``position_ids [B|1, S]`` (default: after the
        cached ones); ``attention_mask``: the model's 2D ``[B, T]`` padding mask or a 4D mask;
        ``cache``: a model cache (the per-iteration states of earlier tokens are read from it and
        the new tokens' are appended), ``None`` in training."""
        B, S, _ = latent.shape
        store = chain_store(cache) if cache is not None else None
        past = store.get(layer_idx) if store is not None else None
        past_len = 0 if past is None else past[0].shape[2]
        if store is not None and past_len != cache.get_seq_length(layer_idx):
            raise ValueError(f"lru_cross_read: the cache holds {cache.get_seq_length(layer_idx)} positions of layer "
                             f"{layer_idx} but per-iteration LRU states of {past_len} (a cache filled by another model?)")
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S, device=latent.device)[None]
        allowed, valid = read_mask(attention_mask, S, None if past is None else past[2], B, latent.device)
        res = chain_act(latent, self, position_ids, allowed, past=None if past is None else past[:2],
                        keep_states=store is not None)
        out, lru_out, states = res
        if store is not None:
            store.append(layer_idx, *states, valid)
        return out, lru_out

    def extra_repr(self) -> str:
        c = self.config
        return super().extra_repr() + f", cross_read(read_dim={c.read_dim}, rope {c.read_rope_dim})"


def chain_act(x: torch.Tensor, unit: ChainReasoningUnit, position_ids: torch.Tensor,
              allowed: Optional[torch.Tensor], past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
              keep_states: bool = False):
    """The recurrence (definition in the module docstring) on ``x [B, S, d]``.

    ``allowed [B|1, S, T]`` (``None``: causal over the S new tokens); ``past``: the cached
    ``(states [N,B,T-S,d], keys [N,B,T-S,k])`` of earlier positions. Returns ``(out, LRUOutput,
    (states [N,B,S,d], keys [N,B,S,k]) | None)``; states[n] is the state the read of iteration
    n+1 sees. Same ACT semantics as ``metareason.ops.lru_act`` (reference: the masked loop).
    """
    cfg = unit.config
    N, thr, fixed = cfg.max_iterations, cfg.halt_threshold, cfg.fixed_iterations
    B, S, d = x.shape
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    W, U, b, W_h, U_h, b_h, w_p, b_p = (t.to(ct) for t in unit.params())
    W_rq, W_rk, V = unit.W_rq.to(ct), unit.W_rk.to(ct), torch.cat([unit.V, unit.V_h]).to(ct)
    k_dim, r_dim = cfg.read_dim, cfg.read_rope_dim
    scale = 1.0 / math.sqrt(k_dim)
    # RoPE on the last read_rope_dim dims of q and k (a decoupled rope slice), as one GEMM per
    # iteration: rotate_half(W·h) = (R·W)·h for the fixed signed permutation R, so the projection
    # [W_rq; W_rk; R·W_rq; R·W_rk] gives q, k and their rotated halves at once (no slicing copies).
    if r_dim:
        cos, sin = rope_cos_sin(position_ids.to(x.device), r_dim, cfg.rope_theta, ct)  # [B|1, S, r]
        ones = cos.new_ones(*cos.shape[:-1], k_dim - r_dim)
        zeros = cos.new_zeros(*cos.shape[:-1], k_dim - r_dim)
        cos, sin = torch.cat([ones, cos], -1), torch.cat([zeros, sin], -1)
        R = torch.zeros(k_dim, k_dim, dtype=ct, device=x.device)  # rotate_half on the rope slice: v @ R
        R[k_dim - r_dim:, k_dim - r_dim:] = rotate_half(torch.eye(r_dim, dtype=ct, device=x.device))
        W_read = torch.cat([W_rq, W_rk, R.T @ W_rq, R.T @ W_rk])
    else:
        W_read = torch.cat([W_rq, W_rk])

    def project(t):  # (q, k), rotated
        parts = (t @ W_read.T).split(k_dim, dim=-1)
        if not r_dim:
            return parts
        return parts[0] * cos + parts[2] * sin, parts[1] * cos + parts[3] * sin

    mask = None if allowed is None else allowed[:, None]
    gx = xf @ U.T + b
    hx = xf @ U_h.T + b_h
    h = xf
    running = torch.ones(B, S, dtype=torch.bool, device=x.device)
    cum = xf.new_zeros(B, S)
    out = torch.zeros_like(xf)
    rem = xf.new_zeros(B, S)
    n_iter = torch.zeros(B, S, dtype=torch.long, device=x.device)
    probs, residuals, kept_states, kept_keys = [], [], [], []
    for n in range(1, N + 1):
        src = h  # the read sees the current (iteration n-1) states; halted tokens' are frozen
        q, k = project(src)
        if keep_states:
            kept_states.append(src)
            kept_keys.append(k)
        if past is None:
            m = F.scaled_dot_product_attention(q[:, None], k[:, None], src[:, None], attn_mask=mask,
                                               is_causal=mask is None, scale=scale)[:, 0]
        else:  # the cached positions and the new ones scored apart (no copy of the cache)
            past_v, past_k = past[0][n - 1].to(ct), past[1][n - 1].to(ct)
            scores = torch.cat([q @ past_k.transpose(1, 2), q @ k.transpose(1, 2)], dim=-1) * scale
            a = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            T = past_v.shape[1]
            m = torch.baddbmm(a[..., T:] @ src, a[..., :T], past_v)
        gm = m @ V.T
        z, r = torch.sigmoid(h @ W.T + gx + gm[..., :2 * d]).chunk(2, dim=-1)
        h_tilde = torch.tanh((r * h) @ W_h.T + hx + gm[..., 2 * d:])
        h_new = (1 - z) * h + z * h_tilde
        p = torch.sigmoid(h_new @ w_p + b_p)
        live = running.to(ct)
        probs.append(p * live)
        residuals.append(torch.linalg.vector_norm(h_new - h, dim=-1) * live)
        if fixed:
            h = h_new
            continue
        new_cum = cum + p
        stop = running & ((new_cum.detach() >= thr) | (n == N))
        R = 1 - cum
        weight = torch.where(stop, R, torch.where(running, p, torch.zeros_like(p)))
        out = out + weight[..., None] * h_new
        rem = torch.where(stop, R, rem)
        n_iter = torch.where(stop, torch.full_like(n_iter, n), n_iter)
        cum = torch.where(running, new_cum, cum)
        h = torch.where(running[..., None], h_new, h)  # a halted token's state stays frozen
        running = running & ~stop
        if n < N and not bool(running.any()):  # every token halted: the rest is frozen
            zero = xf.new_zeros(B, S)
            probs += [zero] * (N - n)
            residuals += [zero] * (N - n)
            if keep_states:
                k_last = project(h)[1]
                kept_states += [h] * (N - n)
                kept_keys += [k_last] * (N - n)
            break
    if fixed:
        out = h
        n_iter = torch.full_like(n_iter, N)
    lru_out = LRUOutput(halt_probs=torch.stack(probs, -1), ponder_cost=n_iter.to(ct) + rem, num_iterations=n_iter,
                        remainders=rem, residuals=torch.stack(residuals, -1))
    states = (torch.stack(kept_states), torch.stack(kept_keys)) if keep_states else None
    return out.to(x.dtype), lru_out, states


def build_lru(config: LRUConfig) -> LatentReasoningUnit:
    """The LRU of a layer: :class:`ChainReasoningUnit` when ``config.cross_read``, else the plain one."""
    return ChainReasoningUnit(config) if config.cross_read else LatentReasoningUnit(config)
