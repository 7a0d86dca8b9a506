"""Training loops of the kernel. Both call the same hooks; the algorithm is ``train.algorithm``."""
from __future__ import annotations


def run_training(kernel, resume: bool = False, overwrite: bool = False) -> dict:
    algorithm = kernel.config.train.algorithm
    if algorithm == "sft":
        from metareason.train.sft import train_sft

        return train_sft(kernel, resume=resume, overwrite=overwrite)
    if algorithm == "grpo":
        from metareason.train.grpo import train_grpo

        return train_grpo(kernel, resume=resume, overwrite=overwrite)
    raise ValueError(f"train.algorithm: {algorithm!r} is not implemented")
