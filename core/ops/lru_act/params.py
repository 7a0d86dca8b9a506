"""Parameters of the Latent Reasoning Unit (LRU) recurrence.

Shapes, for a latent of width ``d``:

====== ========= ==============================================
field  shape     role
====== ========= ==============================================
W      [2d, d]   z and r gates from the state h (rows 0..d-1: z)
U      [2d, d]   z and r gates from the input x
b      [2d]      gate bias
W_h    [d, d]    candidate from r ⊙ h
U_h    [d, d]    candidate from x
b_h    [d]       candidate bias
w_p    [d]       halting probability from h
b_p    []        halting bias (0-dim tensor)
====== ========= ==============================================
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LRUParams(NamedTuple):
    W: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor
    W_h: torch.Tensor
    U_h: torch.Tensor
    b_h: torch.Tensor
    w_p: torch.Tensor
    b_p: torch.Tensor

    @property
    def dim(self) -> int:
        return self.W_h.shape[0]

    def to(self, *args, **kwargs) -> "LRUParams":
        return LRUParams(*(t.to(*args, **kwargs) for t in self))

    @classmethod
    def init(
        cls,
        d: int,
        *,
        gain: float = 1.0,
        halt_bias: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> "LRUParams":
        """Random init: weights ~ U(-gain/√d, gain/√d), biases zero, ``b_p = halt_bias``."""
        bound = gain / math.sqrt(d)

        def u(*shape):
            t = torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1
            return (t * bound).to(dtype=dtype, device=device)

        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(
            W=u(2 * d, d),
            U=u(2 * d, d),
            b=zeros(2 * d),
            W_h=u(d, d),
            U_h=u(d, d),
            b_h=zeros(d),
            w_p=u(d),
            b_p=torch.tensor(float(halt_bias), dtype=dtype, device=device),
        )
