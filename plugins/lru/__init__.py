"""ZeroModel: MLA attention with a Latent Reasoning Unit (LRU) and ACT halting.

    from metareason.plugins.lru import (MLAConfig, MLAAttention, LRUConfig, LatentReasoningUnit,
                                        DeepSeekMLAConfig, DeepSeekMLAForCausalLM)

Names resolve lazily, so loading the plugin (``metareason.plugins.lru.plugin``) does not import
torch or transformers. User documentation: ``docs/lru.md``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MLAConfig": "config",
    "LRUConfig": "config",
    "DeepSeekMLAConfig": "config",
    "MLAAttention": "mla_attention",
    "LatentReasoningUnit": "lru",
    "LRUOutput": "lru",
    "DeepSeekMLAModel": "modeling",
    "DeepSeekMLAForCausalLM": "modeling",
    "register": "modeling",
    "lru_loss_terms": "losses",
    "LRUForwardStats": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
