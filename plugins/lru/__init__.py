"""ZeroModel: MLA attention with a Latent Reasoning Unit (LRU) and ACT halting.

    from metareason.plugins.lru import (MLAConfig, MLAAttention, LRUConfig, LatentReasoningUnit,
                                        DeepSeekMLAConfig, DeepSeekMLAForCausalLM)

Importing this package registers ``deepseek_mla`` with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (the Hugging Face convention for a custom architecture), so a saved model
loads with ``AutoModelForCausalLM.from_pretrained(d)`` and no Kernel. The one exception is the
kernel's plugin discovery (``metareason.plugins.lru.plugin`` as an entry point), which must not
import torch; the kernel registers the architecture itself through ``metareason_register_models``.
Other names resolve lazily. User documentation: ``docs/lru.md``.
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


def _register_unless_discovering_plugins() -> None:
    from metareason.api import loading_entry_points

    if not loading_entry_points():
        from metareason.plugins.lru.modeling import register

        register()


_register_unless_discovering_plugins()


def __dir__():
    return sorted(list(globals()) + __all__)
