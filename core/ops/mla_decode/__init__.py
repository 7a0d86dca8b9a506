"""MLA latent decode attention: ``mla_decode`` (fused front), ``mla_decode_reference`` (spec)."""
from metareason.ops.mla_decode.fused import mla_decode
from metareason.ops.mla_decode.reference import absorb_queries, mla_decode_reference, mla_decompress_attention

__all__ = ["absorb_queries", "mla_decode", "mla_decode_reference", "mla_decompress_attention"]
