"""LRU/ACT recurrence: ``lru_act`` (fused front), ``lru_act_reference`` (spec), ``LRUParams``."""
from metareason.ops.lru_act.fused import lru_act
from metareason.ops.lru_act.params import LRUParams
from metareason.ops.lru_act.reference import LRUActOutput, lru_act_reference

__all__ = ["LRUActOutput", "LRUParams", "lru_act", "lru_act_reference"]
