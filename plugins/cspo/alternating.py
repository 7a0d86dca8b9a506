"""Alternating control inference: the target generates, the alter writes control segments.

The target is loaded through a :class:`metareason.Kernel` (so its tokenizer gets the control
tokens and generation runs through ``metareason.generation.generate``) with a
:class:`~metareason.plugins.cspo.handover.HandoverController` registered on it; the controller
calls the alter at every hand-over. With ``cspo.ray: true`` (the default) target and alter each
live in their own Ray actor with ``target_model_gpu`` / ``alter_model_gpu`` GPUs (0 when the
Ray cluster has none), placed together by one placement group (PACK: one bundle per actor, on
one node when it fits), and the hand-over is a call from the target's actor to the alter's.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from metareason.api import UserError, read_yaml


# ------------------------------------------------------------------------------------ target
def resolve_target(config: Any) -> tuple[dict, Optional[str]]:
    """``(raw kernel config for the target, checkpoint to load or None)``.

    ``cspo.target_model_name`` may be a run directory (its ``config.yaml`` model section and
    latest checkpoint, LoRA adapters included), a checkpoint directory inside a run, or a
    local Hugging Face model directory; unset, the run's own ``model`` section is the target.
    """
    from metareason.api import latest_checkpoint

    raw = config.model_dump(mode="json")
    raw["quiet"] = True
    name = config.cspo.target_model_name
    if name is None:
        if raw["model"].get("path"):
            raw["model"]["path"] = os.path.abspath(raw["model"]["path"])
        return raw, None
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"cspo.target_model_name: {name}: no such directory")
    ckpt: Optional[Path] = None
    run_dir: Optional[Path] = None
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        run_dir, ckpt = path, latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"cspo.target_model_name: {name}: the run has no checkpoint yet")
    elif (path / "trainer_state.json").is_file() and (path.parent.parent / "config.yaml").is_file():
        run_dir, ckpt = path.parent.parent, path
    if run_dir is not None:
        model = read_yaml(run_dir / "config.yaml").get("model") or {}
        if model.get("path"):
            model["path"] = os.path.abspath(model["path"])
        if (model.get("tokenizer") or {}).get("path"):
            model["tokenizer"]["path"] = os.path.abspath(model["tokenizer"]["path"])
        raw["model"] = model
        return raw, str(ckpt.resolve())
    if not (path / "config.json").is_file():
        raise UserError(f"cspo.target_model_name: {name}: not a run directory or a Hugging Face model directory")
    raw["model"] = {"path": str(path.resolve()), "dtype": config.model.dtype, "device": config.model.device,
                    "trust_remote_code": config.model.trust_remote_code}
    return raw, None


def check_alter(config: Any) -> None:
    from metareason.plugins.cspo.config import PROGRAMMATIC

    if config.cspo.alter_generator:
        if config.cspo.alter_generator not in config.generators:
            known = ", ".join(sorted(config.generators)) or "none configured"
            raise UserError(f"cspo.alter_generator: no generator named {config.cspo.alter_generator!r} "
                            f"in generators: ({known})")
        return
    name = config.cspo.alter_model_name
    if name != PROGRAMMATIC and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"cspo.alter_model_name: {name}: not 'programmatic' and not a local Hugging Face "
                        "model directory (no config.json)")


class TargetRunner:
    """The target model with the hand-over controller; a Ray actor class or a plain object."""

    def __init__(self, raw: dict, checkpoint: Optional[str], alter: Any, remote: bool,
                 threads: Optional[int] = None):
        import torch

        from metareason.api import Kernel
        from metareason.plugins.cspo.handover import HandoverController

        if threads:
            torch.set_num_threads(threads)
        self.kernel = Kernel(raw)
        self.model, self.tokenizer = self.kernel.load()
        if checkpoint:
            from metareason.api import load_weights_into

            load_weights_into(self.model, Path(checkpoint))
        self.model.eval()
        if remote:
            import ray

            def call(req):
                return ray.get(alter.control.remote(req))
        else:
            call = alter.control
        self.controller = HandoverController(self.kernel.config.cspo, self.tokenizer, call)
        self.kernel.register(self.controller, name="cspo_handover")

    def generate(self, prompts: list[str], examples: list[dict]) -> list[dict]:
        from metareason.api import generate

        self.controller.hidden = {}
        gens = generate(self.kernel, self.model, self.tokenizer, prompts, examples=examples,
                        max_handovers=self.kernel.config.cspo.max_handovers, desc="alternate")
        out = []
        for i, g in enumerate(gens):
            row = asdict(g)
            row["text"] = self.controller.transcript(i, g.text)
            row["hidden_handovers"] = [{"offset": o, "text": t} for o, t in self.controller.hidden.get(i, [])]
            out.append(row)
        return out

    def stats(self) -> dict:
        return {"takeovers": self.controller.takeovers, "declined": self.controller.declined}

    def pid(self) -> int:
        return os.getpid()

    def placement_group_id(self) -> Optional[str]:
        import ray

        pg = ray.get_runtime_context().get_placement_group_id()
        return str(pg) if pg else None


class AlterRunner:
    """The alter (programmatic or a local HF model); a Ray actor class or a plain object."""

    def __init__(self, name: str, cspo: dict, device: str, dtype: str, generators: Optional[dict] = None,
                 plugins: Optional[list] = None, threads: Optional[int] = None):
        from metareason.plugins.cspo.alter import build_alter
        from metareason.plugins.cspo.config import CSPOSection

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.alter = build_alter(name, CSPOSection.model_validate(cspo), device=device, dtype=dtype,
                                 generators=generators, plugins=plugins)

    def control(self, request) -> str:
        return self.alter.control(request)

    def pid(self) -> int:
        return os.getpid()

    def placement_group_id(self) -> Optional[str]:
        import ray

        pg = ray.get_runtime_context().get_placement_group_id()
        return str(pg) if pg else None


# ------------------------------------------------------------------------------------ pair
def _gpus(requested: int, available: float, field: str) -> int:
    if requested and not available:
        print(f"[cspo] {field}={requested} but the Ray cluster has no GPU: running on the CPU (num_gpus=0)",
              file=sys.stderr)
        return 0
    if requested > available:
        raise UserError(f"{field}: {requested} GPUs requested, the Ray cluster has {available:g}")
    return requested


PLACEMENT_TIMEOUT_S = 120.0


def _pack(cpus: float, alter_gpus: int, target_gpus: int):
    """A PACK placement group: bundle 0 for the alter, bundle 1 for the target."""
    import ray
    from ray.util.placement_group import placement_group

    bundles = [{k: v for k, v in (("CPU", cpus), ("GPU", g)) if v} for g in (alter_gpus, target_gpus)]
    if not all(bundles):
        raise UserError("cspo.ray: the Ray cluster has no CPU or GPU to place the target and alter actors on")
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise UserError(f"cspo: the placement group {bundles} (PACK) cannot be placed on the Ray cluster "
                        f"({ray.cluster_resources()}) within {PLACEMENT_TIMEOUT_S:g} s") from None
    return pg


class AlternatingPair:
    """Target + alter, each in its own Ray actor (``cspo.ray``) or both in this process."""

    def __init__(self, config: Any):
        check_alter(config)
        self.config = config
        cs = config.cspo
        raw, ckpt = resolve_target(config)
        alter_name = cs.alter_model_name
        if alter_name != "programmatic" and not cs.alter_generator:
            alter_name = str(Path(alter_name).expanduser().resolve())
        cpus = os.cpu_count() or 1
        threads = max(1, cpus // 2) if cs.ray else None
        generators = {k: v.model_dump(mode="json") for k, v in config.generators.items()}
        args = (alter_name, cs.model_dump(mode="json"), config.model.device, config.model.dtype, generators,
                config.plugins)
        self._ray_started = False
        self.placement_group = None
        if not cs.ray:
            self.alter = AlterRunner(*args)
            self.target = TargetRunner(raw, ckpt, self.alter, remote=False)
            return
        import ray

        from metareason.api import connect_ray as connect

        # a private runtime on 127.0.0.1 unless Ray is already up (even when a `ray start`
        # cluster runs on this machine)
        self._ray_started = connect("local", num_cpus=cpus)
        have_gpus = ray.cluster_resources().get("GPU", 0)
        have_cpus = ray.cluster_resources().get("CPU", 0)
        per_actor = 1 if have_cpus >= 2 else have_cpus / 2
        ag = _gpus(cs.alter_model_gpu, have_gpus, "cspo.alter_model_gpu")
        tg = _gpus(cs.target_model_gpu, have_gpus, "cspo.target_model_gpu")
        if ag + tg > have_gpus:
            raise UserError(f"cspo.target_model_gpu + cspo.alter_model_gpu: {tg} + {ag} GPUs requested, "
                            f"the Ray cluster has {have_gpus:g}")
        self.placement_group = _pack(per_actor, ag, tg)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        def bundle(i):
            return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i)

        self.alter = ray.remote(AlterRunner).options(num_gpus=ag, num_cpus=per_actor, scheduling_strategy=bundle(0)) \
            .remote(*args, threads=threads)
        self.target = ray.remote(TargetRunner).options(num_gpus=tg, num_cpus=per_actor,
                                                       scheduling_strategy=bundle(1)).remote(
            raw, ckpt, self.alter, True, threads)

    def _call(self, method: str, *args):
        fn = getattr(self.target, method)
        if not self.config.cspo.ray:
            return fn(*args)
        import ray

        try:
            return ray.get(fn.remote(*args))
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise

    def generate(self, prompts: list[str], examples: list[dict], quiet: bool = False) -> list[dict]:
        from metareason.api import progress

        out: list[dict] = []
        bs = self.config.generation.batch_size
        bar = progress(total=len(prompts), desc="alternating generation", quiet=quiet)
        for start in range(0, len(prompts), bs):
            out.extend(self._call("generate", prompts[start:start + bs], examples[start:start + bs]))
            bar.update(min(bs, len(prompts) - start))
        bar.close()
        return out

    def stats(self) -> dict:
        return self._call("stats")

    def close(self) -> None:
        if self.config.cspo.ray:
            import ray

            for actor in (self.target, self.alter):
                ray.kill(actor)
            if self.placement_group is not None:
                ray.util.remove_placement_group(self.placement_group)
            if self._ray_started:
                ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_enabled(config: Any, what: str) -> None:
    from metareason.api import ConfigError, config_source

    if not config.cspo.enabled:
        source = config_source(config)
        raise ConfigError(f"{source}: cspo.enabled: must be true for {what} (the control tokens are added then)")
