"""Connecting to a Ray cluster (or starting a local one) for ``--ray [ADDRESS|local]``."""
from __future__ import annotations

import os
from typing import Optional

from metareason.errors import UserError

LOCAL_OBJECT_STORE = 100_000_000  # bytes; a local runtime for tiny runs and tests


def ray_module():
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is in the install
        raise UserError("--ray: ray is not installed (pip install 'metareason[ray]')") from None
    return ray


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """``ray.init`` for ``address`` (``None``/``"local"``: a new local runtime; ``"auto"`` or
    ``HOST:PORT``: an existing cluster). Returns True when this call started Ray (and so the
    caller shuts it down). Already connected: nothing is done."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address in (None, "", "local"):
        # address="local": always a new private runtime, even when a cluster started by
        # `ray start` is running on this machine (ray.init() would join it and refuse num_cpus)
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE, **kwargs)
    else:
        _probe(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster there "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return True


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT that does not accept a TCP connection is an error now (``ray.init`` would keep
    retrying for minutes)."""
    import socket

    if "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise UserError(f"--ray {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                        f"start one with `ray start --head --port {port}`") from None


def worker_resources(scale) -> dict[str, float]:
    """Resources of one worker/actor: ``scale.resources_per_worker``, else 1 CPU (+1 GPU)."""
    res = {str(k): float(v) for k, v in scale.resources_per_worker.items()}
    res.setdefault("CPU", 1.0)
    if scale.use_gpu:
        res.setdefault("GPU", 1.0)
    return res
