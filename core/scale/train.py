"""Data-parallel SFT with Ray Train: the kernel's SFT loop inside every ``TorchTrainer`` worker.

The driver sends the raw run config; each worker builds its own :class:`~metareason.Kernel` and
runs :func:`metareason.train.sft.train_sft` with a :class:`~metareason.scale.dist.TorchDistributed`
(gloo on the CPU, nccl with ``scale.use_gpu``), which shards every global batch, scales the loss
by the global token count and all-reduces the gradients. Rank 0 owns the run directory: it
writes the kernel's atomic checkpoints, metrics and report; the other ranks write into a private
scratch directory and never checkpoint. After every checkpoint all ranks call
``ray.train.report`` (rank 0 with the checkpoint), so Ray Train knows the latest one. When a
worker dies Ray Train restarts the group (``scale.max_failures``); each new worker finds the last
reported checkpoint (``ray.train.get_checkpoint``) and the run directory's latest (the driver
empties the run directory for a fresh run, so any checkpoint there means a restart), puts the
newer into its own run directory if it is not there already, and the loop resumes from it exactly
as ``metareason run --resume`` does.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from metareason.durable import atomic_dir
from metareason.errors import UserError

KILL_ENV = "METAREASON_SCALE_KILL"  # fault injection for tests: "RANK:STEP:MARKER_FILE"


def absolute_paths(raw: dict, cwd: str) -> dict:
    """Paths the workers resolve (output_dir, model and tokenizer paths) made absolute."""
    import copy

    raw = copy.deepcopy(raw)
    raw["output_dir"] = os.path.join(cwd, raw.get("output_dir") or "runs")
    model = raw.setdefault("model", {}) or {}
    if model.get("path"):
        model["path"] = os.path.join(cwd, model["path"])
    tok = model.get("tokenizer") or {}
    if tok.get("path"):
        tok["path"] = os.path.join(cwd, tok["path"])
    return raw


def checkpoint_step(directory: Path) -> int:
    import json

    from metareason.checkpoint import TRAINER_STATE

    return int(json.loads((Path(directory) / TRAINER_STATE).read_text())["step"])


def materialize(checkpoint_dir: str, run_dir: Path) -> None:
    """Copy a checkpoint into ``run_dir/checkpoints/step-N`` unless it is there."""
    step = checkpoint_step(Path(checkpoint_dir))
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    if final.is_dir():
        return
    # the prefix of a partial checkpoint, which clean_partial removes after a crash
    with atomic_dir(final, prefix=f".tmp-step-{step:07d}-") as tmp:
        shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)


def _maybe_die(spec: Optional[str], rank: int, step: int) -> None:
    """Fault injection (tests): SIGKILL this worker once, right after checkpoint ``step``."""
    if not spec:
        return
    kill_rank, kill_step, marker = spec.split(":", 2)
    if int(kill_rank) == rank and int(kill_step) == step and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} killed at step {step}\n")
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def train_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs."""
    import ray.train
    import torch

    from metareason.checkpoint import latest_checkpoint
    from metareason.kernel import Kernel
    from metareason.scale.dist import TorchDistributed
    from metareason.train.sft import train_sft

    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])  # relative task paths resolve as on the driver
    if loop_config.get("threads"):
        torch.set_num_threads(loop_config["threads"])
    raw = dict(loop_config["raw"])
    main_run_dir = Path(raw["output_dir"]) / raw.get("name", "run")
    rank = ray.train.get_context().get_world_rank()
    scratch = None
    if rank != 0:  # a private run directory (removed at the end), no evaluation
        scratch = tempfile.mkdtemp(prefix=f"metareason-rank{rank}-")
        raw.update(output_dir=scratch, quiet=True)
        raw["eval"] = dict(raw.get("eval") or {}, at_end=False)
        raw["train"] = dict(raw.get("train") or {}, eval_every=0)
    kernel = Kernel(raw)
    # The driver emptied the run directory for a fresh run, so a checkpoint found now means a
    # restart (or --resume): the newest of the run directory's own and Ray Train's last reported
    # one (a worker can die before Ray Train registers the last report).
    resume = False
    candidates = [latest_checkpoint(main_run_dir)]
    reported = ray.train.get_checkpoint()
    with (reported.as_directory() if reported is not None else contextlib.nullcontext()) as directory:
        if directory is not None:
            candidates.append(Path(directory))
        found = [c for c in candidates if c is not None]
        if found:
            newest = max(found, key=checkpoint_step)
            materialize(str(newest), kernel.config.run_dir)
            resume = True
            print(f"[scale] rank {rank}: resuming from step {checkpoint_step(newest)}", file=sys.stderr, flush=True)

    def report(step: int, path: Optional[Path], metrics: dict) -> None:
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({"step": step, "tokens_seen": metrics.get("tokens_seen", 0)}, checkpoint=checkpoint)
        _maybe_die(loop_config.get("kill"), rank, step)

    try:
        train_sft(kernel, resume=resume, dist=TorchDistributed(report=report))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_sft_on_ray(kernel, resume: bool = False, overwrite: bool = False) -> dict:
    """Run ``kernel``'s SFT config on the connected Ray cluster; returns rank 0's final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from metareason.metrics import read_metrics

    cfg = kernel.config
    scale = cfg.scale
    if cfg.train.batch_size < scale.num_workers:
        raise UserError(f"{kernel.source}: train.batch_size: {cfg.train.batch_size} rows cannot be split over "
                        f"scale.num_workers={scale.num_workers} workers")
    from metareason.scale.runtime import worker_resources

    from metareason.train.loop import prepare_run_dir

    cwd = os.getcwd()
    raw = absolute_paths(kernel.raw_config, cwd)
    run_dir = Path(raw["output_dir"]) / cfg.name
    storage = scale.storage_path or str(run_dir / "ray")
    # A fresh run starts from an empty run directory and no Ray Train state; the workers then
    # treat any checkpoint they find as a restart to resume from.
    prepare_run_dir(kernel, resume, overwrite)
    if not resume and Path(storage, "train").exists():
        shutil.rmtree(Path(storage, "train"))
    resources = worker_resources(scale)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"raw": raw, "cwd": cwd, "kill": os.environ.get(KILL_ENV),
                           "threads": max(1, int(resources.get("CPU", 1)))},
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=scale.placement_strategy),
        run_config=RunConfig(name="train", storage_path=os.path.abspath(storage),
                             failure_config=FailureConfig(max_failures=scale.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last)),
    )
    print(f"[scale] data-parallel SFT: {scale.num_workers} Ray Train workers "
          f"({'nccl' if scale.use_gpu else 'gloo'}), {resources} each; cluster {ray.cluster_resources()}",
          file=sys.stderr, flush=True)
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError: the workers' error is in its message
        raise UserError(f"Ray Train run failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1]}") from exc
    metrics: dict = {}
    for row in read_metrics(run_dir):
        metrics.update({k: v for k, v in row.items() if k.startswith("eval/")})
    return metrics
