"""The Triton kernels, interpreted on the CPU: tests/triton_cases.py in a fresh interpreter with
TRITON_INTERPRET=1 (set before triton is imported, which a whole-suite run cannot guarantee)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


def test_triton_kernels_interpreted_match_the_references():
    env = dict(os.environ, TRITON_INTERPRET="1", METAREASON_OPS="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(HERE / "triton_cases.py")], cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
