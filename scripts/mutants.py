#!/usr/bin/env python3
"""Mutation audit of the defining mechanisms: `make mutants`.

Each entry of scripts/mutants.yaml and of scripts/mutants/*.yaml (one file per method plugin) removes or breaks one mechanism (a mask, a loss term, a
weight, halting, clipping, advantage scaling, checkpoint atomicity, hook wiring, kernel dispatch,
a config check) by replacing an exact snippet of one file, and names the tests that must notice.
For every entry this script applies the change in a scratch copy of the repository (never in
the working tree), runs only those tests against the copy, and reports the mutant as

* killed   - a listed test failed (the first failing test is shown),
* survived - every listed test passed: the mechanism can break without the suite noticing,
* stale    - the snippet is not in the file exactly once (the code moved: update the entry).

It exits 1 unless every mutant is killed. The scratch copy imports as `metareason` through
PYTHONPATH (ahead of the editable install), so subprocesses the tests start see the mutant too.

    python scripts/mutants.py [--only ID[,ID...]] [--list] [--file F.yaml ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"id", "mechanism", "file", "find", "replace", "tests"}


@dataclass
class Mutant:
    id: str
    mechanism: str
    file: str
    find: str
    replace: str
    tests: list[str]


def default_files() -> list[Path]:
    """scripts/mutants.yaml (kernel, ops, early plugins) and one scripts/mutants/<plugin>.yaml per plugin."""
    return [REPO / "scripts" / "mutants.yaml"] + sorted((REPO / "scripts" / "mutants").glob("*.yaml"))


def load_all(paths: list[Path]) -> list[Mutant]:
    out: list[Mutant] = []
    seen: dict[str, Path] = {}
    for path in paths:
        for m in load(path):
            if m.id in seen:
                raise SystemExit(f"error: {path}: mutant id {m.id!r} is also in {seen[m.id]}")
            seen[m.id] = path
            out.append(m)
    return out


def load(path: Path) -> list[Mutant]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    out, seen = [], set()
    for i, entry in enumerate(raw):
        where = f"{path}: entry {i + 1}"
        if not isinstance(entry, dict) or set(entry) != FIELDS:
            missing, extra = FIELDS - set(entry or {}), set(entry or {}) - FIELDS
            raise SystemExit(f"error: {where}: fields must be exactly {sorted(FIELDS)} "
                             f"(missing {sorted(missing)}, unknown {sorted(extra)})")
        if entry["id"] in seen:
            raise SystemExit(f"error: {where}: duplicate id {entry['id']!r}")
        seen.add(entry["id"])
        if entry["find"] == entry["replace"]:
            raise SystemExit(f"error: {where} ({entry['id']}): replace equals find")
        tests = entry["tests"] if isinstance(entry["tests"], list) else [entry["tests"]]
        out.append(Mutant(entry["id"], " ".join(str(entry["mechanism"]).split()), entry["file"], entry["find"],
                          entry["replace"], [str(t) for t in tests]))
    return out


def scratch_copy(dest: Path) -> Path:
    """The tracked tree (plus the built extension) and src/metareason laid out as installed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for so in REPO.glob("core/_C*.so"):
        shutil.copy2(so, dest / "core" / so.name)
    pkg = dest / "src" / "metareason"
    shutil.copytree(dest / "core", pkg)
    shutil.copytree(dest / "plugins", pkg / "plugins")
    return dest


def installed_path(root: Path, rel: str) -> Path:
    """Where ``rel`` (core/..., plugins/...) lives in the scratch package; other files in place."""
    if rel.startswith("core/"):
        return root / "src" / "metareason" / rel[len("core/"):]
    if rel.startswith("plugins/"):
        return root / "src" / "metareason" / "plugins" / rel[len("plugins/"):]
    return root / rel


def run_one(m: Mutant, root: Path, timeout: float) -> tuple[str, str, float]:
    target = installed_path(root, m.file)
    if not target.is_file():
        return "stale", f"{m.file}: no such file", 0.0
    original = target.read_text(encoding="utf-8")
    count = original.count(m.find)
    if count != 1:
        return "stale", f"snippet found {count} times in {m.file}", 0.0
    target.write_text(original.replace(m.find, m.replace), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]),
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-o", "addopts=", *m.tests], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        out, code = "timed out", -1
    finally:
        target.write_text(original, encoding="utf-8")
        for cache in target.parent.glob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
    seconds = time.monotonic() - t0
    if code == 0:
        return "survived", "all listed tests passed", seconds
    if code == 5:
        return "stale", "the listed tests collected nothing", seconds
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if failed:
        return "killed", failed.group(1), seconds
    if code == -1:
        return "killed", f"timed out after {timeout:.0f}s", seconds
    return "killed", f"pytest exit {code}: " + (out.strip().splitlines() or ["?"])[-1][:120], seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", action="append",
                   help="a mutants YAML file (repeatable); default: scripts/mutants.yaml and scripts/mutants/*.yaml")
    p.add_argument("--only", help="comma list of mutant ids")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests")
    args = p.parse_args(argv)
    mutants = load_all([Path(f) for f in args.file] if args.file else default_files())
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in mutants}
        if unknown:
            raise SystemExit(f"error: --only: unknown mutant(s) {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id:36s} {m.file:40s} {m.mechanism}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="metareason-mutants-") as tmp:
        root = scratch_copy(Path(tmp))
        for i, m in enumerate(mutants, 1):
            status, detail, seconds = run_one(m, root, args.timeout)
            rows.append((m, status, detail, seconds))
            print(f"[{i}/{len(mutants)}] {status:8s} {m.id} ({seconds:.0f}s) {detail}", flush=True)
    print()
    print("| mutant | mechanism | result | killed by / why | s |")
    print("|---|---|---|---|---|")
    for m, status, detail, seconds in rows:
        print(f"| {m.id} | {m.mechanism} | {status} | {detail} | {seconds:.0f} |")
    bad = [m.id for m, status, _, _ in rows if status != "killed"]
    killed = len(rows) - len(bad)
    print(f"\n{killed} killed, {len(bad)} not killed, of {len(rows)} mutants")
    if bad:
        print("not killed: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
