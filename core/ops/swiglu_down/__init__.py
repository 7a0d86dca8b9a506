"""SwiGLU + down projection (``LlamaMLP`` after its gate / up projections) that saves two
``[tokens, intermediate]`` tensors for backward instead of four: ``swiglu_down`` (the fused
front), ``swiglu_down_reference`` (the spec)."""
from metareason.ops.swiglu_down.fused import swiglu_down
from metareason.ops.swiglu_down.reference import swiglu_down_reference

__all__ = ["swiglu_down", "swiglu_down_reference"]
