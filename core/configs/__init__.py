"""Run configs shipped inside the package (package data), so commands that default to one work
from an installed wheel. ``configs/`` in the repository holds the same files for users to read
and copy (tests/test_wheel.py checks that the two copies are identical)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_config(name: str) -> Path:
    """The path of the packaged config ``name`` (e.g. ``quickstart.yaml``)."""
    return Path(str(resources.files(__name__) / name))


QUICKSTART = packaged_config("quickstart.yaml")
