"""Fused linear cross-entropy: the output projection and the token loss (or the sampled
tokens' log-probs) in chunks of tokens, never materialising ``[tokens, vocab]`` logits.
``linear_cross_entropy`` / ``linear_token_logps`` (fused fronts), ``*_reference`` (the spec)."""
from metareason.ops.linear_ce.fused import linear_cross_entropy, linear_token_logps
from metareason.ops.linear_ce.reference import linear_cross_entropy_reference, linear_token_logps_reference

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "linear_token_logps",
           "linear_token_logps_reference"]
