"""Forward matmul FLOPs per token of the experiment's groups A–E, for "accuracy at equal compute".

    from metareason.plugins.lru.flops import flops_per_token
    flops_per_token(arch, seq_len=256, mean_iterations=2.5)   # arch: a config's model.arch mapping
    # {'attention_projections': ..., 'attention_scores': ..., 'mlp': ..., 'lru': ..., 'lru_read': ...,
    #  'lm_head': ..., 'total': ...}

Every matrix product counts ``2·m·n·k`` (per token: 2 × input width × output width). Counted:
every projection (Llama's q/k/v/o; MLA's W_DQ, W_UQ or W_Q, W_DKV, W_KR, W_UK, W_UV, W_O in the
expanded form that training and prefill run), attention scores and the weighted sum of values over
the mean causal context ``(seq_len + 1) / 2`` keys (``causal=False``: ``seq_len``), the SwiGLU MLP
(three matrices), the LM head, and in LRU layers: the input parts of the gates once (``U·x``,
``U_h·x``) and per iteration ``W·h``, ``W_h·(r⊙h)``, ``w_p·h``; group E adds per iteration the
read's query / key projections, its scores and weighted sum over the causal context (values are the
``d_c``-wide latents) and ``[V; V_h]·m``.

Left out (not matmuls, or not per token): RMSNorms, RoPE, softmax, activations and the GRU's
elementwise gating, residual adds, the embedding lookup, the loss. The iterations are the *mean*
per token (what the fused ``lru_act`` runs, it compacts halted tokens away); the PyTorch masked
loop of group E (``chain.py``) computes every token's rows until the last token of the batch
halts, so its real cost is higher than this count when halting varies. Decoding with a cache
(absorbed attention over the cached latents) is not what is counted here.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

TERMS = ("attention_projections", "attention_scores", "mlp", "lru", "lru_read", "lm_head")


def _get(arch: Any, name: str, default=None):
    if isinstance(arch, Mapping):
        return arch.get(name, default)
    return getattr(arch, name, default)


def group_of(arch: Any) -> str:
    """``A`` (llama), ``B`` (MLA), ``C`` (+ LRU, fixed), ``D`` (+ LRU, ACT), ``E`` (+ cross-read)."""
    model_type = _get(arch, "model_type")
    if model_type == "llama":
        return "A"
    if model_type != "deepseek_mla":
        raise ValueError(f"model_type: expected llama or deepseek_mla, got {model_type!r}")
    if not _get(arch, "use_lru", True):
        return "B"
    if _get(arch, "lru_cross_read", False):
        return "E"
    return "C" if _get(arch, "lru_fixed_iterations", False) else "D"


def flops_per_token(arch: Any, seq_len: int, mean_iterations: Optional[float] = None,
                    vocab_size: Optional[int] = None, causal: bool = True) -> dict[str, float]:
    """Forward matmul FLOPs per token (terms and ``total``) of a model of ``arch`` (a ``model.arch``
    mapping or a transformers config) on sequences of ``seq_len`` tokens.

    ``mean_iterations``: LRU iterations per token (ACT groups; default ``lru_max_iterations``;
    ignored in fixed mode, which runs all of them). ``vocab_size``: when ``arch`` has none (the
    kernel fills it in from the tokenizer; the character tokenizer has 101).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
    vocab = vocab_size if vocab_size is not None else _get(arch, "vocab_size")
    if vocab is None:
        raise ValueError("vocab_size: the arch has none, pass vocab_size=")
    group = group_of(arch)
    h = _get(arch, "hidden_size")
    layers = _get(arch, "num_hidden_layers")
    H = _get(arch, "num_attention_heads")
    inter = _get(arch, "intermediate_size") or 64 * math.ceil(h * 8 / 3 / 64)
    ctx = (seq_len + 1) / 2 if causal else float(seq_len)
    t = dict.fromkeys(TERMS, 0.0)
    t["mlp"] = layers * 3 * 2 * h * inter
    t["lm_head"] = 2 * h * vocab
    if group == "A":
        dh = _get(arch, "head_dim") or h // H
        kv = _get(arch, "num_key_value_heads") or H
        t["attention_projections"] = layers * 2 * (h * H * dh + 2 * h * kv * dh + H * dh * h)
        t["attention_scores"] = layers * 2 * 2 * H * dh * ctx
    else:
        dc, dr = _get(arch, "kv_latent_dim", 512), _get(arch, "rope_head_dim", 64)
        dq = _get(arch, "q_latent_dim", 1536) or 0
        dn = _get(arch, "nope_head_dim") or h // H
        dv = _get(arch, "v_head_dim") or h // H
        q = h * dq + dq * H * (dn + dr) if dq else h * H * (dn + dr)
        t["attention_projections"] = layers * 2 * (q + h * dc + h * dr + dc * H * dn + dc * H * dv + H * dv * h)
        t["attention_scores"] = layers * 2 * (H * (dn + dr) + H * dv) * ctx
        if group != "B":
            lru_layers = _get(arch, "lru_layers")
            n_lru = layers if lru_layers is None else len(lru_layers)
            N = _get(arch, "lru_max_iterations", 8)
            n = N if group == "C" or mean_iterations is None else float(mean_iterations)
            if group == "E" and _get(arch, "lru_fixed_iterations", False):
                n = N
            if not 0 < n <= N:
                raise ValueError(f"mean_iterations: expected a number in (0, {N}], got {mean_iterations!r}")
            d = dc
            t["lru"] = n_lru * 2 * (3 * d * d + n * (3 * d * d + d))
            if group == "E":
                k = _get(arch, "lru_read_dim", 16)
                t["lru_read"] = n_lru * 2 * n * (2 * k * d + (k + d) * ctx + 3 * d * d)
    t["total"] = sum(t[k] for k in TERMS)
    return t
