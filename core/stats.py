"""Method-neutral statistics that comparisons of runs share."""
from __future__ import annotations

import math


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes from the discordant counts: ``b``
    pairs where only the first was right, ``c`` where only the second was; twice the binomial
    (b + c, 1/2) tail at ``min(b, c)``, capped at 1 (1.0 when there is no discordant pair)."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n  # exact ints, one rounding
    return min(1.0, 2 * tail)
