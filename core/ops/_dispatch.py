"""Backend selection shared by the ops.

Order: cuda -> triton -> cpu extension -> reference, keeping only backends that can run the
op on the inputs' device. ``METAREASON_OPS`` (or an op's ``backend=`` argument) forces one;
a forced backend that cannot run raises :class:`BackendUnavailableError` instead of silently
falling back, so a benchmark or test never measures something other than what it asked for.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV = "METAREASON_OPS"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on these inputs."""


def forced_backend(explicit: str | None = None) -> str | None:
    name = explicit if explicit is not None else os.environ.get(ENV, "").strip() or None
    if name is not None and name not in BACKENDS:
        src = "backend" if explicit is not None else ENV
        raise ValueError(f"{src}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def select(op: str, why_not: Mapping[str, str | None], explicit: str | None = None) -> str:
    """Pick a backend for ``op``. ``why_not[b]`` is None when backend ``b`` can run, else the reason."""
    forced = forced_backend(explicit)
    if forced is not None:
        reason = why_not.get(forced, "not implemented for this op")
        if reason is not None:
            how = f"backend={forced!r}" if explicit is not None else f"{ENV}={forced}"
            raise BackendUnavailableError(f"{op}: {how} was requested but that backend is unavailable: {reason}")
        return forced
    for name in BACKENDS:
        if why_not.get(name, "not implemented") is None:
            return name
    return "reference"


def torch_code_why_not(device: torch.device, triton: str | None) -> dict[str, str | None]:
    """The backends of an op written in torch code: ``reference`` anywhere, ``cpu`` / ``cuda`` on
    their device; ``triton``: the given reason (None = it can run)."""
    return {
        "reference": None,
        "cpu": None if device.type == "cpu" else f"inputs are on {device}, the cpu backend needs CPU tensors",
        "cuda": None if device.type == "cuda" else f"inputs are on {device}, the cuda backend needs CUDA tensors",
        "triton": triton,
    }


def extension_why_not(device: torch.device, backend: str, symbol: str) -> str | None:
    """Reason the compiled extension cannot run ``symbol`` for ``backend`` on ``device`` (None = it can)."""
    from metareason.ops._extension import extension

    ext = extension()
    if ext is None:
        return "the compiled extension metareason._C is not built (pip install without METAREASON_NO_EXT=1)"
    if backend == "cpu":
        if device.type != "cpu":
            return f"inputs are on {device}, the cpu backend needs CPU tensors"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"inputs are on {device}, the cuda backend needs CUDA tensors"
        if not ext.has_cuda():
            return "metareason._C was built without CUDA (torch without CUDA or no nvcc at build time)"
    if not hasattr(ext, symbol):
        return f"metareason._C has no {symbol} (rebuild the extension)"
    return None


def triton_why_not(device: torch.device, explicit: str | None = None) -> str | None:
    """Reason the Triton kernels cannot run on ``device`` (None = they can).

    Triton runs on CUDA. On the CPU it runs only under ``TRITON_INTERPRET=1`` (numpy, slow:
    for tests), and then only when forced, so the interpreter is never picked by default.
    """
    if device.type != "cuda":
        if not (os.environ.get("TRITON_INTERPRET", "0") == "1" and forced_backend(explicit) == "triton"):
            return (f"inputs are on {device}: Triton kernels run on CUDA (on the CPU only when forced "
                    "under TRITON_INTERPRET=1)")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'metareason[triton]')"
    return None
