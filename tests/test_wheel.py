"""The installed package works from a wheel, away from the checkout: a wheel built from the tracked
files, installed with ``--no-deps`` into a fresh virtual environment outside the repository (its
dependencies are the test environment's, through a plain path in a ``.pth`` file, which runs no
editable-install finder), then ``metareason run`` on the packaged quickstart config and
``metareason bench kernels --quick`` from a temporary working directory.

The wheel is built without the C++ extension (``METAREASON_NO_EXT=1``: the ops run on their
reference path), which keeps this test at about a minute; ``METAREASON_WHEEL_EXT=1`` builds and
checks the extension too, as a user's ``pip install`` would (a few more CPU minutes).
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from metareason.configs import QUICKSTART

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_quickstart_is_the_repository_one():
    """configs/quickstart.yaml (what users read and copy) and the packaged copy the commands
    default to never diverge."""
    assert QUICKSTART.is_file()
    assert QUICKSTART.read_bytes() == (ROOT / "configs" / "quickstart.yaml").read_bytes(), \
        "configs/quickstart.yaml and core/configs/quickstart.yaml differ: change both"


def _tracked_copy(dest: Path) -> None:
    """The tracked files of the checkout (no build outputs, no local links) under ``dest``."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the wheel is built from the tracked files")
    for name in out.decode().split("\0"):
        if not name:
            continue
        src = ROOT / name
        if not src.exists():  # deleted in the work tree, not yet committed
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _run(cmd: list, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_wheel_runs_the_quickstart_and_the_kernel_bench_outside_the_checkout(tmp_path):
    src, wheels, venv, work = (tmp_path / n for n in ("src", "wheels", "venv", "work"))
    _tracked_copy(src)
    build_env = _clean_env(METAREASON_CUDA="0")
    with_ext = os.environ.get("METAREASON_WHEEL_EXT") == "1"
    if not with_ext:
        build_env["METAREASON_NO_EXT"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", wheels, src], cwd=tmp_path, env=build_env, timeout=1200)
    (wheel,) = wheels.glob("metareason-*.whl")

    # a fresh environment whose dependencies come from the one running this test
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=_clean_env(), timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "_test_deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(deps)))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path, env=_clean_env(), timeout=600)

    work.mkdir()
    # the built-in plugins only: not the plugins that the test environment may hold (tests/ext_plugin)
    env = _clean_env(METAREASON_PLUGINS="lru,cspo,behaviors,memory_reason,mcft")
    where = _run([py, "-c", "import metareason, metareason.configs as c; print(metareason.__file__); "
                            "print(c.QUICKSTART)"], cwd=work, env=env, timeout=120).stdout.split()
    package, quickstart = Path(where[0]), Path(where[1])
    assert package.is_relative_to(venv) and quickstart.is_relative_to(venv), where  # the wheel, not the checkout
    assert quickstart.read_bytes() == QUICKSTART.read_bytes()
    assert bool(list(package.parent.glob("_C*.so"))) == with_ext

    metareason = venv / "bin" / "metareason"
    _run([metareason, "run", quickstart, "train.max_steps=2", "train.log_every=1", "train.save_every=2",
          "eval.max_samples=4", "generation.max_new_tokens=8", "quiet=true", "output_dir=runs"],
         cwd=work, env=env, timeout=900)
    run_dir = work / "runs" / "quickstart"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and "train/loss" in rows[0] and any("eval/accuracy" in r for r in rows)
    assert (run_dir / "report.md").is_file() and list((run_dir / "checkpoints").glob("step-*"))

    _run([metareason, "bench", "kernels", "--quick", "--no-compile", "--out", work / "kernels"],
         cwd=work, env=env, timeout=900)
    (path,) = (work / "kernels").glob("kernels-cpu*.json")  # kernels-cpu-quick.json
    record = json.loads(path.read_text())
    assert record["rows"] and record["quick"]
    assert ("cpu" in record["backends"]) == with_ext  # the compiled ops exactly when the wheel holds them
    assert not (work / "bench").exists() and not (ROOT / "bench-results").exists()
