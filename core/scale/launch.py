"""``metareason run CONFIG --ray [ADDRESS|local]``: the configured algorithm on a Ray cluster."""
from __future__ import annotations

import sys


def run_on_ray(kernel, address: str, resume: bool = False, overwrite: bool = False) -> dict:
    """SFT: Ray Train data-parallel workers. GRPO: the learner here, ``scale.num_workers``
    rollout actors on the cluster."""
    from metareason.scale.runtime import connect

    started = connect(address)
    try:
        import ray

        print(f"[scale] connected to Ray ({'new local runtime' if started else 'existing cluster'}): "
              f"{ray.cluster_resources()}", file=sys.stderr, flush=True)
        if kernel.config.train.algorithm == "sft":
            from metareason.scale.train import run_sft_on_ray

            return run_sft_on_ray(kernel, resume=resume, overwrite=overwrite)
        from metareason.scale.rollout import RolloutPool
        from metareason.train.grpo import train_grpo

        with RolloutPool(kernel) as pool:
            return train_grpo(kernel, resume=resume, sampler=pool, overwrite=overwrite)
    finally:
        if started:
            import ray

            ray.shutdown()
