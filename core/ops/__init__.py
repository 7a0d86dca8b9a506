"""Python front of the compiled kernels: one function per op.

Dispatch order: cuda -> triton -> cpu extension -> torch reference. ``METAREASON_OPS`` forces
one backend (``reference|cpu|triton|cuda``); a forced backend that is not available is an
error, never a silent fallback.
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
    backends = ["reference"]
    ext = extension()
    if ext is not None:
        backends.append("cpu")
    return backends
