"""Reference RMSNorm: the spec, transformers' ``LlamaRMSNorm.forward`` (also Mistral's, Qwen2's,
Qwen3's), operation for operation.

The input is upcast to fp32, normalised by ``rsqrt(mean(x^2) + eps)``, cast back to the input's
dtype and multiplied by the weight (type promotion decides the output dtype: fp32 weight times a
bf16 input is fp32). Eagerly, autograd saves the fp32 input, ``rstd`` and the normalised tensor
(a second ``[tokens, hidden]`` tensor per norm).
"""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)
