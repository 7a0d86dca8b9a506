"""Files beside a handbook: the persisted index (written atomically, :mod:`metareason.durable`).

``<handbook>.faiss`` is one file, written in one atomic step, that holds the index *and* the
handbook state it was built from, so the two can never be out of step on disk::

    b"MRBHIDX1" | header length (uint32 LE) | header (JSON) | ids (int64 LE) | vectors (float32 LE)

The header names the handbook state (``embed_epoch``, ``max_id``, ``count``, embedder, ``dim``),
``ids_sha256`` (SHA-256 of the sorted ids: what the handbook is checked against before the file
is trusted) and ``payload_sha256`` (damage). Only ids and vectors are read back, with NumPy from
a checked byte layout: no FAISS or pickle deserialiser ever runs on the file, which may have been
copied from someone else.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Union

import numpy as np

from metareason.api import UserError, atomic_file

MAGIC = b"MRBHIDX1"
FORMAT = 1
MAX_HEADER = 1 << 16
_LEN = struct.Struct("<I")
_HEADER_KEYS = {"format": int, "embed_epoch": int, "max_id": int, "count": int, "dim": int, "embedder": str,
                "ids_sha256": str, "payload_sha256": str}


class HandbookError(UserError):
    """A handbook file that cannot be used; the message is one line naming the file."""


class IndexFileError(ValueError):
    """A persisted index that cannot be trusted; the message says why, in a few words."""


def ids_digest(ids: np.ndarray) -> str:
    """SHA-256 of the ids, sorted, as int64 little-endian (independent of index order)."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def write_index_file(path: Union[str, Path], ids: np.ndarray, vecs: np.ndarray, state: dict) -> None:
    """Persist ``ids`` / ``vecs`` with ``state`` (embed_epoch, max_id, count, embedder, dim)."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    vecs = np.ascontiguousarray(vecs, dtype="<f4").reshape(len(ids), int(state["dim"]))
    payload = [ids.tobytes(), vecs.tobytes()]
    digest = hashlib.sha256()
    for part in payload:
        digest.update(part)
    header = dict(state, format=FORMAT, count=len(ids), ids_sha256=ids_digest(ids), payload_sha256=digest.hexdigest())
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # readers see the old file or the whole new one
        f.writelines([MAGIC, _LEN.pack(len(head)), head, *payload])


def read_index_file(path: Union[str, Path]) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(header, ids, vectors)`` of a persisted index; :class:`IndexFileError` when it is not one
    of ours, is damaged or truncated (``FileNotFoundError`` when absent)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(MAGIC)) != MAGIC:
            raise IndexFileError("not a handbook index (another format, e.g. one written by an older metareason)")
        raw_len = f.read(_LEN.size)
        if len(raw_len) != _LEN.size or not 0 < _LEN.unpack(raw_len)[0] <= MAX_HEADER:
            raise IndexFileError("damaged (bad header length)")
        try:
            header = json.loads(f.read(_LEN.unpack(raw_len)[0]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise IndexFileError("damaged (unreadable header)") from None
        if not isinstance(header, dict) or any(not isinstance(header.get(k), t) or isinstance(header.get(k), bool)
                                               for k, t in _HEADER_KEYS.items()):
            raise IndexFileError("damaged (header fields missing or of the wrong type)")
        if header["format"] != FORMAT:
            raise IndexFileError(f"index format {header['format']} is not {FORMAT}")
        count, dim = header["count"], header["dim"]
        if count < 0 or not 0 < dim <= 1 << 16:
            raise IndexFileError("damaged (count or dim out of range)")
        if size - f.tell() != count * (8 + 4 * dim):
            raise IndexFileError(f"damaged (size {size} bytes does not fit {count} vectors of dimension {dim})")
        payload = f.read()
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise IndexFileError("damaged (payload checksum mismatch)")
    ids = np.frombuffer(payload, dtype="<i8", count=count).astype(np.int64)
    vecs = np.frombuffer(payload, dtype="<f4", offset=8 * count).astype(np.float32).reshape(count, dim)
    if ids_digest(ids) != header["ids_sha256"] or len(np.unique(ids)) != count:
        raise IndexFileError("damaged (ids do not match their checksum)")
    return header, ids, vecs
