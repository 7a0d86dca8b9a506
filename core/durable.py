"""Durable writes: fsync of files, of directory trees and of the directories that hold them.

A rename publishes a file or directory only once what it names is on disk: write, fsync every file
and the directory itself, rename, then fsync the parent so the rename survives a power loss. Without
the first fsync a crash can leave a renamed but empty file; without the last, the rename itself can
be lost. Checkpoints, exports and the run directory's own files are written this way.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Make the directory's entries (files created, renamed or removed in it) durable."""
    if os.name == "nt":  # directories cannot be opened there; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # a file system without directory fsync (some network mounts)
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """Every file under ``path``, then every directory, deepest first (``path`` itself last)."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that a crash leaves the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
