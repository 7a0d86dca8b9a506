"""metareason: a plugin-based microkernel for LLM reasoning-optimisation methods.

The kernel knows models, data, training loops, generation and evaluation; every method is a
pluggy plugin (see ``metareason.hookspecs``).

    from metareason import Kernel, hookimpl
"""
from metareason.version import __version__
from metareason.hookspecs import hookimpl, hookspec

__all__ = ["Kernel", "hookimpl", "hookspec", "__version__", "load_config"]


def __getattr__(name):  # heavy imports (torch, transformers) only when asked for
    if name == "Kernel":
        from metareason.kernel import Kernel

        return Kernel
    if name == "load_config":
        from metareason.config import load_config

        return load_config
    raise AttributeError(f"module 'metareason' has no attribute {name!r}")
