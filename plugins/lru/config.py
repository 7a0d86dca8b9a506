"""Configs of the ZeroModel architecture: ``LRUConfig``, ``MLAConfig`` (plain dataclasses, the seed's
names) and ``DeepSeekMLAConfig`` (a transformers config, ``model_type = "deepseek_mla"``).

``DeepSeekMLAConfig`` is the one saved in ``config.json``; it derives the per-layer
``MLAConfig`` / ``LRUConfig`` through :meth:`DeepSeekMLAConfig.mla_config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

MODEL_TYPE = "deepseek_mla"
DEFAULT_LOSS_WEIGHTS = {"stability": 0.1, "sparsity": 0.01, "ponder": 0.001}
#: ``paged``: decoding keeps the latents in 64-row pages and attends through ``metareason.ops.mla_decode``
#: (absorbed queries, as FlashMLA serving does); ``dynamic``: a transformers ``DynamicCache`` and torch attention.
DECODE_CACHES = ("paged", "dynamic")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _check_read(prefix: str, cross_read, read_dim, read_rope_dim) -> None:
    if not isinstance(cross_read, bool):
        raise ValueError(f"{prefix}cross_read: expected true or false, got {cross_read!r}")
    _positive_int(f"{prefix}read_dim", read_dim)
    r = read_rope_dim
    if isinstance(r, bool) or not isinstance(r, int) or r < 0 or r % 2 or r > read_dim:
        raise ValueError(f"{prefix}read_rope_dim: expected an even int in [0, {prefix}read_dim = {read_dim}], got {r!r}")


@dataclass
class LRUConfig:
    """The Latent Reasoning Unit: a GRU-gated refinement of each token's latent with ACT halting.

    ``fixed_iterations=True`` runs exactly ``max_iterations`` steps for every token (the
    no-halting ablation). ``halt_bias_init`` sets the initial halting probability
    σ(halt_bias_init) (−1 → p≈0.27: about 4 steps to reach 0.99 at the start of training).
    """

    latent_dim: int
    max_iterations: int = 8
    halt_threshold: float = 0.99
    fixed_iterations: bool = False
    halt_bias_init: float = -1.0
    init_gain: float = 1.0
    #: group E (``chain.py``): each iteration also reads the earlier positions' current states
    cross_read: bool = False
    read_dim: int = 16  # width of the read's query / key
    read_rope_dim: int = 8  # of which RoPE-rotated (0: content only)
    rope_theta: float = 10000.0

    def __post_init__(self):
        _positive_int("latent_dim", self.latent_dim)
        _positive_int("max_iterations", self.max_iterations)
        t = self.halt_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1):
            raise ValueError(f"halt_threshold: expected a number in (0, 1], got {t!r}")
        _check_read("", self.cross_read, self.read_dim, self.read_rope_dim)


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3) with decoupled RoPE and an optional LRU.

    Keys and values are up-projected from a per-token latent ``c_kv`` of width
    ``kv_latent_dim``; queries from a latent of width ``q_latent_dim`` (``None``/0: a direct
    projection). RoPE is applied to ``rope_head_dim`` extra dimensions only (per-head queries,
    one key shared by all heads); the ``nope_head_dim`` dimensions carry no position.
    """

    hidden_size: int
    num_attention_heads: int
    kv_latent_dim: int = 512
    q_latent_dim: Optional[int] = 1536
    rope_head_dim: int = 64
    nope_head_dim: Optional[int] = None  # default hidden_size // num_attention_heads
    v_head_dim: Optional[int] = None  # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_lru: bool = False
    lru: Optional[LRUConfig] = field(default=None)

    def __post_init__(self):
        for name in ("hidden_size", "num_attention_heads", "kv_latent_dim", "rope_head_dim"):
            _positive_int(name, getattr(self, name))
        if self.rope_head_dim % 2:
            raise ValueError(f"rope_head_dim: must be even, got {self.rope_head_dim}")
        if self.q_latent_dim is not None and self.q_latent_dim != 0:
            _positive_int("q_latent_dim", self.q_latent_dim)
        default_head = self.hidden_size // self.num_attention_heads
        if self.nope_head_dim is None:
            self.nope_head_dim = default_head
        if self.v_head_dim is None:
            self.v_head_dim = default_head
        _positive_int("nope_head_dim", self.nope_head_dim)
        _positive_int("v_head_dim", self.v_head_dim)
        if self.use_lru and self.lru is None:
            self.lru = LRUConfig(latent_dim=self.kv_latent_dim)
        if self.lru is not None and self.lru.latent_dim != self.kv_latent_dim:
            raise ValueError(f"lru.latent_dim: {self.lru.latent_dim} must equal kv_latent_dim {self.kv_latent_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.nope_head_dim + self.rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_head_dim)


@strict
class DeepSeekMLAConfig(PreTrainedConfig):
    """A decoder of MLA attention (+ LRU on the KV latent) and SwiGLU MLPs; Llama-style blocks.

    ``lru_layers``: indices of the layers that get an LRU (``None``: every layer, when
    ``use_lru``). ``lru_loss_weights``: weights of the auxiliary terms that ``forward`` adds to
    ``loss`` when it is given ``labels`` (``stability``, ``sparsity``, ``ponder``); kernel runs
    take them from the run config's ``lru.loss_weights`` instead (the model gets no labels there).
    ``decode_cache``: ``paged`` (default) or ``dynamic``, see ``DECODE_CACHES``.
    ``lru_cross_read`` (group E, :mod:`.chain`): each LRU iteration also takes a causal read over
    the earlier positions' current latents (query / key width ``lru_read_dim``, of which
    ``lru_read_rope_dim`` RoPE-rotated).
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: Optional[int] = None  # default: 8/3 * hidden_size rounded up to 64
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    kv_latent_dim: int = 512
    q_latent_dim: Optional[int] = 1536
    rope_head_dim: int = 64
    nope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = False
    use_lru: bool = True
    lru_max_iterations: int = 8
    lru_halt_threshold: float = 0.99
    lru_fixed_iterations: bool = False
    lru_halt_bias_init: float = -1.0
    lru_init_gain: float = 1.0
    lru_layers: Optional[list] = None
    lru_loss_weights: Optional[dict] = None
    lru_cross_read: bool = False
    lru_read_dim: int = 16
    lru_read_rope_dim: int = 8
    decode_cache: str = "paged"

    def __post_init__(self, **kwargs):
        if self.decode_cache not in DECODE_CACHES:
            raise ValueError(f"decode_cache: expected one of {', '.join(DECODE_CACHES)}, got {self.decode_cache!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "lru_max_iterations"):
            _positive_int(name, getattr(self, name))
        t = self.lru_halt_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1):
            raise ValueError(f"lru_halt_threshold: expected a number in (0, 1], got {t!r}")
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        _positive_int("intermediate_size", self.intermediate_size)
        _check_read("lru_", self.lru_cross_read, self.lru_read_dim, self.lru_read_rope_dim)
        if self.lru_cross_read and not self.use_lru:
            raise ValueError("lru_cross_read: needs use_lru: true (the read is part of the LRU)")
        if self.lru_layers is not None:
            bad = [i for i in self.lru_layers
                   if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"lru_layers: {bad[0]!r} is not a layer index (0..{self.num_hidden_layers - 1})")
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for key, value in (self.lru_loss_weights or {}).items():
            if key not in DEFAULT_LOSS_WEIGHTS:
                raise ValueError(f"lru_loss_weights.{key}: unknown term (known: {', '.join(DEFAULT_LOSS_WEIGHTS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"lru_loss_weights.{key}: expected a number >= 0, got {value!r}")
            weights[key] = float(value)
        self.lru_loss_weights = weights
        super().__post_init__(**kwargs)
        self.mla_config(0)  # validates the attention / LRU fields with their own messages

    def layer_has_lru(self, layer_idx: int) -> bool:
        return bool(self.use_lru) and (self.lru_layers is None or layer_idx in self.lru_layers)

    def lru_config(self) -> LRUConfig:
        return LRUConfig(latent_dim=self.kv_latent_dim, max_iterations=self.lru_max_iterations,
                         halt_threshold=self.lru_halt_threshold, fixed_iterations=self.lru_fixed_iterations,
                         halt_bias_init=self.lru_halt_bias_init, init_gain=self.lru_init_gain,
                         cross_read=self.lru_cross_read, read_dim=self.lru_read_dim,
                         read_rope_dim=self.lru_read_rope_dim, rope_theta=self.rope_theta)

    def mla_config(self, layer_idx: int) -> MLAConfig:
        use = self.layer_has_lru(layer_idx)
        return MLAConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            kv_latent_dim=self.kv_latent_dim, q_latent_dim=self.q_latent_dim or None,
            rope_head_dim=self.rope_head_dim, nope_head_dim=self.nope_head_dim, v_head_dim=self.v_head_dim,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, attention_bias=self.attention_bias,
            attention_dropout=self.attention_dropout, use_lru=use, lru=self.lru_config() if use else None,
        )
