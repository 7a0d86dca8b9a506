"""Durable writes: the one place that writes a file or directory atomically, and appends JSONL.

A rename publishes a file or directory only once what it names is on disk: write, fsync every file
and the directory itself, rename, then fsync the parent so the rename survives a power loss. Without
the first fsync a crash can leave a renamed but empty file; without the last, the rename itself can
be lost. A failure before the rename removes the temporary and leaves the old content in place.

* :func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`write_json_atomic`,
  :func:`write_jsonl_atomic`: replace a file whole;
* :func:`atomic_file`: a temporary path for writers that want a file name (a plot, a Parquet file);
* :func:`atomic_dir`: a temporary directory renamed into place;
* :func:`append_jsonl`: one JSON line per call, flushed and fsynced, so earlier lines survive a crash
  and a line torn by one is cut off before the next is appended.

Checkpoints (:mod:`metareason.checkpoint`) keep their own multi-step protocol on top of these fsyncs.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

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


def _temp_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique per process and thread (concurrent writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it is fsynced and replaces ``path``,
    on an exception it is removed and ``path`` keeps its old content (or stays absent)."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that a crash leaves the old or the new content."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = 2) -> None:
    """``obj`` as JSON (a final newline), replacing ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def _jsonl_line(row: Any) -> str:
    return json.dumps(row) + "\n"


def write_jsonl_atomic(path: PathLike, rows: Iterable[Any]) -> None:
    """One JSON object per line, replacing ``path`` atomically."""
    write_text_atomic(path, "".join(_jsonl_line(r) for r in rows))


def append_jsonl(path: PathLike, row: Any) -> None:
    """Append ``row`` as one line with a single write, then fsync. A last line left without its
    newline by a crash is cut off first, so a new row is never glued to a torn one."""
    data = _jsonl_line(row).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            _cut_torn_tail(fd, size)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int, size: int) -> None:
    """Truncate the file after its last newline (to empty when it has none)."""
    end, chunk = size, 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        pos = os.pread(fd, end - start, start).rfind(b"\n")
        if pos != -1:
            os.ftruncate(fd, start + pos + 1)
            return
        end = start
    os.ftruncate(fd, 0)


@contextmanager
def atomic_dir(path: PathLike, prefix: Optional[str] = None, replace: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` to fill. On success every file and directory in
    it is fsynced, it is renamed to ``path`` and the parent is fsynced; on an exception it is removed.

    An existing empty ``path`` is replaced; a non-empty one only with ``replace`` (it is renamed
    aside first and removed once the new directory is in place), else the rename fails.
    ``prefix``: the temporary's name prefix (default ``.<name>.tmp-``), e.g. one that a cleanup of
    partial directories recognises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old / path.name, path)
                shutil.rmtree(old, ignore_errors=True)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
