"""Scale-out on Ray: data-parallel SFT (Ray Train), GRPO rollout actors, sweeps (Ray Tune).

Imported lazily: nothing here loads Ray unless a run asks for it (``--ray``, ``metareason sweep``).
See docs/scale.md.
"""
