"""GRPO rollout workers: N Ray actors, each with a copy of the policy, generate the groups of a
shard of the step's prompts; the learner (the driver, ``metareason.train.grpo``) trains.

Weights: once per step the learner puts its trainable parameters into the object store
(one shared ``ray.put``) with a version number (the step). Every shard request carries the
version and the reference; an actor whose version differs (a new step, or an actor restarted
by Ray with ``scale.max_restarts``, which comes back with no version) fetches the weights before
generating.

Sampling: each prompt's group is generated under its own seed, a function of
(``train.seed``, version, prompt index in the step), so the completions do not depend on how
the prompts were sharded, on which actor took a shard, or on how many actors there are: a
re-issued shard gives the same completions, and :class:`LocalSampler` (the same code in this
process) gives the same rollouts as the actors.

Failures: every ``ray.get``/``ray.wait`` has a timeout (``scale.get_timeout_s``). An actor Ray
restarts (``scale.max_restarts``, also ``max_task_retries``) gets the call that was running again,
as a new process, which fetches the current weights first. A shard whose
actor died, raised, or timed out is re-issued to the actors still working; an actor that failed
is skipped for the rest of the step, and dropped for the rest of the run after more failures
than Ray restarts it (``scale.max_restarts``). The step fails with :class:`RolloutError` only
when no actor is left.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from typing import Any, Optional

import torch

from metareason.errors import UserError


class RolloutError(UserError):
    """No rollout worker is left to generate a shard."""


def group_seed(seed: int, version: int, index: int) -> int:
    return ((seed * 1_000_003 + version) * 100_003 + index) % (2 ** 63 - 1)


def sample_groups(kernel, model, tokenizer, prompts: list[str], seeds: list[int], share_prompts: bool) -> list:
    """``num_generations`` completions per prompt, each group under its own seed (the caller's
    RNG state is restored afterwards)."""
    from metareason.generation.generate import generate_batch
    from metareason.train.grpo import sampling_defaults

    cfg, rl = kernel.config, kernel.config.rl
    device = next(model.parameters()).device
    gen_kwargs = dict(sampling_defaults(tokenizer), **rl.generation_kwargs)
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            out += generate_batch(model, tokenizer, [prompt] * rl.num_generations,
                                  max_new_tokens=rl.max_completion_length, do_sample=True,
                                  temperature=rl.temperature, top_p=rl.top_p, stop=list(cfg.generation.stop),
                                  device=device, generate_kwargs=gen_kwargs, share_prompts=share_prompts,
                                  decoder=cfg.generation.decoder)
    return out


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What the learner changes: the parameters that require grad (copied to the CPU)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


class LocalSampler:
    """The actors' sampling, in this process (the single-process reference)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, model, tokenizer, prompts: list[str], version: int, share_prompts: bool = False) -> list:
        seed = self.kernel.config.train.seed
        return sample_groups(self.kernel, model, tokenizer, prompts,
                             [group_seed(seed, version, i) for i in range(len(prompts))], share_prompts)


class RolloutWorker:
    """A Ray actor holding one copy of the policy."""

    def __init__(self, raw: dict, threads: Optional[int], timeout_s: float):
        from metareason.kernel import Kernel
        from metareason.train.loop import seed_everything

        if threads:
            torch.set_num_threads(threads)
        self.kernel = Kernel(raw)
        seed_everything(self.kernel.config.train.seed)  # the learner's random init, before any push
        self.model, self.tokenizer = self.kernel.load()
        self.model.eval()
        self.timeout_s = timeout_s
        self.version, self.fetches = -1, 0

    def generate(self, version: int, weights: list, prompts: list[str], seeds: list[int],
                 share_prompts: bool) -> list[dict]:
        """``weights``: ``[ObjectRef]`` (in a list, so that Ray resolves it only when needed)."""
        if self.version != version:
            import ray

            state = ray.get(weights[0], timeout=self.timeout_s)
            missing = set(state) - set(dict(self.model.named_parameters()))
            if missing:
                raise RuntimeError(f"pushed weights name parameters this actor's model lacks: {sorted(missing)[:3]}")
            self.model.load_state_dict(state, strict=False)
            self.version, self.fetches = version, self.fetches + 1
        gens = sample_groups(self.kernel, self.model, self.tokenizer, prompts, seeds, share_prompts)
        return [asdict(g) for g in gens]

    def info(self) -> dict:
        import ray

        return {"version": self.version, "fetches": self.fetches, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}


class RolloutPool:
    """``scale.num_workers`` rollout actors in a placement group (``scale.placement_strategy``)."""

    def __init__(self, kernel, num_workers: Optional[int] = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from metareason.scale.runtime import worker_resources
        from metareason.scale.train import absolute_paths

        self.kernel = kernel
        scale = kernel.config.scale
        self.timeout_s = scale.get_timeout_s
        n = num_workers or scale.num_workers
        res = worker_resources(scale)
        bundle = {k: v for k, v in res.items() if v > 0}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=scale.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise UserError(f"scale: {n} rollout workers of {bundle} ({scale.placement_strategy}) cannot be placed "
                            f"on the Ray cluster within {self.timeout_s:g} s (it has {ray.cluster_resources()})") from None
        raw = absolute_paths(kernel.raw_config, os.getcwd())
        raw["quiet"] = True
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        cls = ray.remote(RolloutWorker)
        self.actors = [cls.options(num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0), resources=custom or None,
                                   max_restarts=scale.max_restarts, max_task_retries=scale.max_restarts,
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i))
                       .remote(raw, max(1, int(res.get("CPU", 1))), self.timeout_s) for i in range(n)]
        self.alive = list(range(n))
        self.version: Optional[int] = None
        self._weights: list = []
        self.reissued = 0  # shards given to another actor after a failure (whole run)
        self.failures: dict[int, int] = {}
        print(f"[scale] {n} GRPO rollout actors, {bundle} each, {scale.placement_strategy}", file=sys.stderr,
              flush=True)

    # ------------------------------------------------------------------ weights
    def push(self, model, version: int) -> None:
        """One ``ray.put`` of the trainable parameters per version, shared by every actor."""
        import ray

        if version != self.version:
            self._weights = [ray.put(trainable_state(model))]
            self.version = version

    # ------------------------------------------------------------------ sampling
    def __call__(self, model, tokenizer, prompts: list[str], version: int, share_prompts: bool = False) -> list:
        import ray

        from metareason.generation.generate import Generation

        self.push(model, version)
        seed = self.kernel.config.train.seed
        seeds = [group_seed(seed, version, i) for i in range(len(prompts))]
        usable = list(self.alive)
        if not usable:
            raise RolloutError(f"GRPO rollout step {version}: no rollout worker is left (all failed)")
        k = min(len(usable), len(prompts))
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        shards = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
        results: dict[int, list] = {}
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
        queue = list(range(len(shards)))
        busy: set[int] = set()
        errors: list[str] = []

        def dispatch() -> None:
            while queue:
                free = [a for a in usable if a not in busy]
                if not free:
                    return
                s, a = queue.pop(0), free[0]
                idx = shards[s]
                ref = self.actors[a].generate.remote(version, self._weights, [prompts[i] for i in idx],
                                                     [seeds[i] for i in idx], share_prompts)
                pending[ref] = (s, a)
                busy.add(a)

        dispatch()
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # the remaining shards timed out: their actors count as failed
                for ref, (s, a) in list(pending.items()):
                    errors.append(f"actor {a}: no answer within scale.get_timeout_s={self.timeout_s:g} s")
                    ray.cancel(ref, force=True)
                    del pending[ref]
                    self._fail(a, usable, busy, queue, s, timed_out=True)
            for ref in ready:
                s, a = pending.pop(ref)
                try:
                    results[s] = ray.get(ref, timeout=self.timeout_s)
                    busy.discard(a)
                except (ray.exceptions.RayError, TimeoutError) as exc:
                    errors.append(f"actor {a}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
                    self._fail(a, usable, busy, queue, s,
                               restarting=isinstance(exc, ray.exceptions.ActorUnavailableError))
            if queue and not usable:
                raise RolloutError(f"GRPO rollout step {version}: no rollout worker is left for "
                                   f"{len(queue)} shard(s) ({'; '.join(errors)})")
            if queue:
                deadline = time.monotonic() + self.timeout_s
            dispatch()
        out = []
        for s in range(len(shards)):
            out += [Generation(**g) for g in results[s]]
        return out

    def _fail(self, actor: int, usable: list, busy: set, queue: list, shard: int, timed_out: bool = False,
              restarting: bool = False) -> None:
        """Put the shard of a failed call back in the queue. The actor stays usable in this step only
        when Ray is restarting it (a new call waits for the new process, which re-fetches the
        weights); it is dropped for the run after more failures than Ray restarts it
        (``scale.max_restarts``)."""
        busy.discard(actor)
        queue.append(shard)
        self.reissued += 1
        self.failures[actor] = self.failures.get(actor, 0) + 1
        exhausted = self.failures[actor] > self.kernel.config.scale.max_restarts
        if (exhausted or not restarting) and actor in usable:
            usable.remove(actor)
        if exhausted and actor in self.alive:
            self.alive.remove(actor)
            if timed_out:
                import ray

                ray.kill(self.actors[actor], no_restart=True)
        print(f"[scale] rollout actor {actor} failed ({'timeout' if timed_out else 'error'}); its shard is "
              f"re-issued ({len(usable)} actor(s) left this step, {len(self.alive)} in the pool)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.pg)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
