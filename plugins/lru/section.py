"""The ``lru`` section of a run config (always present, defaulted; only ``deepseek_mla`` runs use it).

    lru:
      loss_weights: {pred: 1.0, stability: 0.1, sparsity: 0.01, ponder: 0.001}
      group: D                      # label in `metareason lru sweep` reports
      description: MLA + LRU, adaptive halting
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from metareason.api import Section


class LossWeights(Section):
    """Weights of the seed's loss terms (``L_pred`` is the kernel's token loss)."""

    pred: float = Field(1.0, ge=0)
    stability: float = Field(0.1, ge=0)
    sparsity: float = Field(0.01, ge=0)
    ponder: float = Field(0.001, ge=0)


class LRUSection(Section):
    loss_weights: LossWeights = LossWeights()
    group: Optional[str] = None  # short label of this run in sweep reports (A, B, C, D)
    description: str = ""  # one line for sweep reports
    stats_batch_size: int = Field(64, gt=0)  # batch size of the per-level LRU statistics pass
