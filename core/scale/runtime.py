"""Connecting to a Ray cluster (or starting a local one) for ``--ray [ADDRESS|local]``.

A local runtime listens on 127.0.0.1 only. Ray binds its servers (GCS, raylet, object manager,
workers, runtime-env agent) to the node address, which on Linux is the machine's network address
unless Ray runs in its single-machine mode: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when
``ray`` is imported and by every process it starts. :func:`connect` sets both (the variable for
the processes it starts, the constant for this one) for the ``ray.init`` of a local runtime only,
and warns when the runtime still came up on another address.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Optional

from metareason.errors import UserError

LOCAL_OBJECT_STORE = 100_000_000  # bytes; a local runtime for tiny runs and tests
LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address in (None, "", "local"):
        # address="local": always a new private runtime, even when a cluster started by
        # `ray start` is running on this machine (ray.init() would join it and refuse num_cpus)
        with _loopback_only():
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE,
                     _node_ip_address=LOOPBACK, **kwargs)
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOOPBACK:
            print(f"[ray] warning: the local Ray runtime listens on {node_ip}, not {LOOPBACK} "
                  f"(ray {ray.__version__}); its ports may be reachable from the network", file=sys.stderr)
    else:
        _probe(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster there "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return True


@contextmanager
def _loopback_only():
    """Ray's single-machine mode for the ``ray.init`` of a local runtime; restored afterwards, so
    a later connection to a real cluster in this process reports the machine's address."""
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - a Ray that moved it: the variable still reaches the processes
        ray_constants = None
    saved_env = os.environ.get(_SINGLE_MACHINE)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_MACHINE] = "0"
    if saved_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = saved_env
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


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
