"""Check the import contracts of ``.importlinter`` (import-linter) on this checkout.

``lint-imports`` analyses the package it finds on ``sys.path``; an editable install maps
``metareason.plugins`` to ``plugins/`` through an import hook that import-linter does not follow,
so this lays out a scratch tree as the installed package (``metareason/`` = ``core/``, with
``metareason/plugins/`` = ``plugins/``, all symlinks) and runs ``lint-imports`` on it.

    python scripts/lint_imports.py [lint-imports arguments, e.g. --contract plugins-are-independent]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout(dest: Path, repo: Path = REPO) -> Path:
    """``dest/metareason`` with a symlink per entry of ``core/`` and ``metareason/plugins`` with one per
    entry of ``plugins/`` (a real directory, so a test can add a module to it); returns ``dest``."""
    pkg = dest / "metareason"
    (pkg / "plugins").mkdir(parents=True)
    for entry in (repo / "core").iterdir():
        if entry.name not in ("plugins", "__pycache__"):
            (pkg / entry.name).symlink_to(entry.resolve())
    for entry in (repo / "plugins").iterdir():
        if entry.name != "__pycache__":
            (pkg / "plugins" / entry.name).symlink_to(entry.resolve())
    return dest


def lint_imports(tree: Path, args: list[str], repo: Path = REPO) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(exe), str(repo / ".importlinter"), "--no-cache", "--no-logo", *args],
                          cwd=tree, env=env, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="metareason-lint-imports-") as tmp:
        res = lint_imports(layout(Path(tmp)), argv)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
