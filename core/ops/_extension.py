"""Which backends this machine has: the compiled extension and Triton. A leaf module (imports no
op), so the op fronts and the dispatcher import it without going through the half-initialised
``metareason.ops`` package."""
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
