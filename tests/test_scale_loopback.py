"""Local Ray runtimes listen on 127.0.0.1 only (issue 34): no port of the runtime that
``--ray local`` (and CSPO's alternating pair) starts is reachable from the network."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

# A fresh process with the user's environment (the test suite's conftest sets Ray's single-machine
# mode for every runtime it starts itself, which would hide the bug).
_PROBE = """
import json, sys, time
import psutil
from metareason.scale.runtime import connect

assert connect("local", num_cpus=1)
import ray

@ray.remote
def pid():
    return 1
ray.get(pid.remote())  # a worker is up, with its own gRPC port
me = psutil.Process()
found = []
for _ in range(20):  # servers come up asynchronously; wait until raylet's ports are there
    found = []
    for p in [me, *me.children(recursive=True)]:
        try:
            found += [[p.pid, p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    if any("raylet" in f[1] for f in found):
        break
    time.sleep(0.5)
print("LISTEN " + json.dumps(found))
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_local_runtime_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("LISTEN ")][-1]
    listening = json.loads(line[len("LISTEN "):])
    names = {name for _, name, _, _ in listening}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening
    exposed = [x for x in listening if x[2] not in LOOPBACK]
    assert exposed == [], f"Ray ports listening beyond loopback: {exposed}"
    assert "warning" not in proc.stderr


def test_cspo_alternating_pair_starts_ray_through_the_loopback_runtime(tmp_path, monkeypatch):
    """CSPO's pair starts its runtime with ``runtime.connect`` (which binds 127.0.0.1), never
    with a ``ray.init`` of its own."""
    import ray

    from metareason import Kernel
    from metareason.plugins.cspo.alternating import AlternatingPair
    from metareason.scale import runtime
    from tests.test_cspo_alternating import ALTER, TARGET
    from tests.test_cspo_takeover import save_bigram

    calls = []

    class Started(Exception):
        pass

    def fake_connect(address=None, num_cpus=None):
        calls.append((address, num_cpus))
        raise Started

    monkeypatch.setattr(runtime, "connect", fake_connect)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called directly"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    target = save_bigram(tmp_path / "target", TARGET)
    alter = save_bigram(tmp_path / "alter", ALTER)
    kernel = Kernel({"plugins": ["cspo"], "quiet": True,
                     "cspo": {"enabled": True, "ray": True, "target_model_name": str(target),
                              "alter_model_name": str(alter), "TRIGGER_TOKENS": ["<control>"]}})
    with pytest.raises(Started):
        AlternatingPair(kernel.config)
    assert calls == [("local", os.cpu_count() or 1)]
