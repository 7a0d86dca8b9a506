"""RMSNorm (transformers' ``LlamaRMSNorm``) that saves its input and the per-token ``rstd`` for
backward, not the normalised tensor: ``rms_norm`` (the fused front), ``rms_norm_reference`` (the spec)."""
from metareason.ops.rms_norm.fused import rms_norm
from metareason.ops.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
