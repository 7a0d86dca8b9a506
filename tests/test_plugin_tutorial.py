"""The plugin of docs/writing-a-plugin.md (examples/plugin-tutorial), as a user gets it: built
and installed by pip (into a scratch directory on PYTHONPATH, so the shared environment stays as
it is), found through its entry point, run in a fresh interpreter. Also: it imports from the
kernel only ``metareason.api``, and the guide's code is the package's code."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

PACKAGE = REPO / "examples" / "plugin-tutorial"
GUIDE = REPO / "docs" / "writing-a-plugin.md"


@pytest.fixture(scope="module")
def tutorial_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("tutorial") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(PACKAGE)],
                   check=True, capture_output=True, text=True)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def test_the_installed_plugin_is_found_through_its_entry_point(tutorial_env):
    res = run_cli("plugins", env=tutorial_env)
    assert res.returncode == 0, res.stderr
    row = [line for line in res.stdout.splitlines() if line.startswith("brevity")]
    assert len(row) == 1 and "metareason-brevity" in row[0] and "0.1.0" in row[0], res.stdout
    for hook in ("config_sections", "transform_prompt", "register_rewards", "on_eval_samples"):
        assert hook in row[0]


def test_reward_prompt_hint_and_eval_metrics_in_a_grpo_run(tutorial_env, tmp_path):
    code = ("from metareason.api import Kernel; k = Kernel('examples/plugin-tutorial/grpo.yaml'); "
            "print(k.rewards.get('brevity')(['abcd', 'x' * 16], [{}, {}], config=k.config))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, **tutorial_env))
    assert res.returncode == 0 and res.stdout.strip() == "[1.0, 0.5]", res.stderr  # max_chars: 8

    res = run_cli("run", "examples/plugin-tutorial/grpo.yaml", f"output_dir={tmp_path}", "quiet=true",
                  env=dict(tutorial_env, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "brevity-tutorial"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rl/reward/brevity/mean"] for r in rows if "rl/reward/brevity/mean" in r]
    assert len(rewards) == 2 and all(0 < r <= 1 for r in rewards)
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].startswith("Answer briefly. ") for s in samples)  # the hint, in every prompt
    chars = [len(s["completion"]) for s in samples]
    last = [r for r in rows if "eval/accuracy" in r][-1]
    assert last["eval/brevity/chars"] == pytest.approx(sum(chars) / len(chars))
    assert last["eval/brevity/within_limit"] == pytest.approx(sum(n <= 8 for n in chars) / len(chars))
    assert "| eval/brevity/within_limit |" in (run / "report.md").read_text()


def test_the_plugin_imports_from_the_kernel_only_the_public_api():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name and name.split(".")[0] == "metareason":
                    assert name == "metareason.api", f"{path}: imports {name}"


def test_the_guide_shows_the_package_code():
    """The python blocks of the guide that name a file (first line ``# metareason_brevity/x.py``)
    are, in order and joined by the two blank lines between top-level definitions, that file."""
    blocks = re.findall(r"```python\n# (metareason_brevity/\S+\.py)[^\n]*\n(.*?)```", GUIDE.read_text(), re.S)
    assert blocks, "no file blocks in the guide"
    shown: dict[str, list[str]] = {}
    for name, body in blocks:
        shown.setdefault(name, []).append(body.strip("\n"))
    for name, bodies in shown.items():
        assert "\n\n\n".join(bodies) + "\n" == (PACKAGE / name).read_text(), name
    assert set(shown) == {"metareason_brevity/config.py", "metareason_brevity/plugin.py"}
