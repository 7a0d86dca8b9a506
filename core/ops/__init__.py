"""Python front of the compiled kernels: one function per op.

Dispatch order: cuda -> triton -> cpu extension -> torch reference. ``METAREASON_OPS`` forces
one backend (``reference|cpu|triton|cuda``); a forced backend that is not available is an
error, never a silent fallback.

Each op lives in ``ops/<name>/`` with ``reference.py`` (the readable spec) beside the fused
front (``fused.py``); see docs/architecture.md, "Compiled kernels".
"""
from __future__ import annotations


def extension():
    """The compiled extension module ``metareason._C``, or ``None`` when it was not built."""
    try:
        from metareason import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def available_backends() -> list[str]:
    """Backends usable on this machine, in dispatch order (reference is always there)."""
    backends = []
    ext = extension()
    import torch

    if ext is not None and ext.has_cuda() and torch.cuda.is_available():
        backends.append("cuda")
    if torch.cuda.is_available() and _dispatch_triton_ok():
        backends.append("triton")
    if ext is not None:
        backends.append("cpu")
    backends.append("reference")
    return backends


def _dispatch_triton_ok() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


from metareason.ops._dispatch import BACKENDS, BackendUnavailableError  # noqa: E402
from metareason.ops.linear_ce import linear_cross_entropy, linear_token_logps  # noqa: E402
from metareason.ops.lru_act import LRUActOutput, LRUParams, lru_act  # noqa: E402
from metareason.ops.mla_decode import mla_decode  # noqa: E402

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "LRUActOutput",
    "LRUParams",
    "available_backends",
    "extension",
    "linear_cross_entropy",
    "linear_token_logps",
    "lru_act",
    "mla_decode",
]
