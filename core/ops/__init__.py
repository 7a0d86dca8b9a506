"""Python front of the compiled kernels: one function per op.

Dispatch order: cuda -> triton -> cpu extension -> torch reference. ``METAREASON_OPS`` forces
one backend (``reference|cpu|triton|cuda``); a forced backend that is not available is an
error, never a silent fallback.

Each op lives in ``ops/<name>/`` with ``reference.py`` (the readable spec) beside the fused
front (``fused.py``); see docs/architecture.md, "Compiled kernels".
"""
from __future__ import annotations

from metareason.ops._extension import _dispatch_triton_ok, available_backends, extension  # noqa: F401
from metareason.ops._dispatch import BACKENDS, BackendUnavailableError
from metareason.ops.linear_ce import linear_cross_entropy, linear_token_logps
from metareason.ops.lru_act import LRUActOutput, LRUParams, lru_act
from metareason.ops.mla_decode import mla_decode
from metareason.ops.rms_norm import rms_norm
from metareason.ops.swiglu_down import swiglu_down

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
    "rms_norm",
    "swiglu_down",
]
