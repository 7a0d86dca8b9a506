"""Handbook JSONL: one behavior per line (``metareason behaviors export|import``).

Import reads and checks the whole file before anything is written: a file above ``max_bytes``,
a line that is not UTF-8, not JSON (``NaN``/``Infinity``, duplicate keys, numbers with too
many digits, nesting too deep) or not a valid behavior (every field: type, range, Unicode; see
:meth:`Behavior.from_json`) is one :class:`HandbookError` line ``FILE:LINE: FIELD: why``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from metareason.api import atomic_file
from metareason.plugins.behaviors.behavior import Behavior, BehaviorError
from metareason.plugins.behaviors.persist import HandbookError

#: the largest file ``import`` reads (bytes); a handbook of 100k behaviors with provenance is ~100 MB
MAX_IMPORT_BYTES = 256 * 1024 * 1024


def _no_constants(name: str):
    raise BehaviorError(f"{name} is not a number (JSON has no NaN or Infinity)")


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise BehaviorError(f"{key}: duplicate key")
        out[key] = value
    return out


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HandbookError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1})") from None
    return text[1:] if lineno == 1 and text.startswith("\ufeff") else text  # a UTF-8 byte order mark


def parse_line(text: str, path: Path, lineno: int, max_sentences: int) -> Behavior:
    try:
        return Behavior.from_json(json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates),
                                  max_sentences)
    except json.JSONDecodeError as exc:
        raise HandbookError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except BehaviorError as exc:
        raise HandbookError(f"{path}:{lineno}: {exc}") from None
    except RecursionError:
        raise HandbookError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
    except ValueError:  # int('9' * 5000): beyond Python's digit limit
        raise HandbookError(f"{path}:{lineno}: invalid JSON (a number with too many digits)") from None


def read_jsonl(path: Union[str, Path], max_sentences: int = 2, max_bytes: int = MAX_IMPORT_BYTES) -> list[Behavior]:
    """Every behavior of a JSONL file, all checked; the first bad line is the error."""
    path = Path(path)
    if not path.is_file():
        raise HandbookError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # never more than the limit, even from a file that grows
    if len(data) > max_bytes:
        raise HandbookError(f"{path}: larger than the import limit of {max_bytes} bytes; split the file")
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        text = _decode(raw, path, lineno)
        if text.strip():
            out.append(parse_line(text, path, lineno, max_sentences))
    return out


def write_jsonl(path: Union[str, Path], behaviors: Sequence[Behavior]) -> int:
    """Write ``behaviors`` to ``path`` atomically (a crash leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.writelines(json.dumps(b.to_json(), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
                     for b in behaviors)
    return len(behaviors)

