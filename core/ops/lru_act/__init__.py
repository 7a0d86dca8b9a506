"""LRU/ACT recurrence: ``lru_act`` (fused front), ``lru_act_reference`` (spec),
``lru_act_eager_compact`` (eager, running rows only: the fair eager baseline), ``LRUParams``."""
from metareason.ops.lru_act.fused import lru_act
from metareason.ops.lru_act.params import LRUParams
from metareason.ops.lru_act.reference import LRUActOutput, lru_act_eager_compact, lru_act_reference

__all__ = ["LRUActOutput", "LRUParams", "lru_act", "lru_act_eager_compact", "lru_act_reference"]
