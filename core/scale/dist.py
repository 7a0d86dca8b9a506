"""What a data-parallel SFT worker does differently from the single process loop.

Every worker builds the same :class:`~metareason.data.tokenize.SFTStream` (same seed) and takes
rows ``rank::world`` of each global batch; its token-sum loss is divided by the *global* token
count of the micro-batch (an all-reduce of the counts), and the gradients are summed over the
workers (an all-reduce of the flattened gradients) before clipping. The summed gradient is then
exactly the gradient of the single-process token mean over the whole global batch, so every
worker takes the same optimizer step as one process would (up to float summation order).

:data:`LOCAL` is the single-process identity; the SFT loop calls the same methods on it.
"""
from __future__ import annotations

from typing import Optional

import torch


class LocalProcess:
    """One process: every method is the identity (the loop's numbers are unchanged)."""

    rank, world_size, is_main = 0, 1, True

    def shard(self, batch: dict) -> dict:
        return batch

    def scale_token_mean(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        return loss

    def total(self, value: float) -> float:
        return value

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def all_reduce_grads(self, params) -> None:
        return None

    def broadcast_params(self, model) -> None:
        return None

    def checkpoint_saved(self, step: int, path: Optional[object], metrics: dict) -> None:
        return None


LOCAL = LocalProcess()


def shard_batch(batch: dict, rank: int, world: int) -> dict:
    """Rows ``rank::world`` of a collated batch (tensors, the ``examples`` list; scalars kept)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[rank::world]
        elif isinstance(value, list):
            out[key] = value[rank::world]
        else:
            out[key] = value
    return out


class TorchDistributed(LocalProcess):
    """A worker of a ``torch.distributed`` process group (gloo on the CPU, nccl on GPUs)."""

    def __init__(self, report=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchDistributed needs an initialised torch.distributed process group")
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self._report = report  # called on every rank after each checkpoint (Ray Train's barrier)
        self._device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend() == "nccl") else torch.device("cpu")

    def shard(self, batch: dict) -> dict:
        if len(batch["input_ids"]) < self.world_size:
            raise ValueError(f"a global batch of {len(batch['input_ids'])} rows cannot be split over "
                             f"{self.world_size} workers (train.batch_size >= scale.num_workers)")
        return shard_batch(batch, self.rank, self.world_size)

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        self._dist.all_reduce(t)
        return t.tolist()

    def scale_token_mean(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """``loss`` is this shard's token mean over ``n`` tokens: return its token sum divided by
        the global token count, so summing the workers' gradients gives the global mean's."""
        (global_n,) = self._sum([float(n)])
        return loss * (n / max(global_n, 1.0))

    def total(self, value: float) -> float:
        return self._sum([value])[0]

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The sum of the workers' (already scaled) losses: every rank sees the same NaN stop."""
        return torch.tensor(self.total(float(loss.detach())))

    def all_reduce_grads(self, params) -> None:
        """Sum the gradients over the workers (one flattened buffer, one all-reduce)."""
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self._device)
        self._dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(g).to(p.device, p.dtype)
            offset += n

    def broadcast_params(self, model) -> None:
        """Start every worker from rank 0's weights (as DDP does)."""
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.data.to(self._device)
            self._dist.broadcast(buf, 0)
            t.data.copy_(buf.to(t.device))

    def checkpoint_saved(self, step: int, path, metrics: dict) -> None:
        if self._report is not None:
            self._report(step, path, metrics)
