"""The behavior handbook: SQLite (the source of truth) + a FAISS index persisted beside it.

* SQLite in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction (a second process
  waits for the lock, up to ``busy_timeout``), so concurrent inserts lose nothing.
* The file is marked with ``PRAGMA application_id`` and versioned with ``PRAGMA user_version``;
  older schemas are migrated in place (``MIGRATIONS``), a newer one is refused. A file that is
  not SQLite, is damaged, or is some other program's database gives one ``HandbookError``
  naming the file, and is never written to.
* Embeddings live in the DB (float32 blobs), so the index can always be rebuilt from it.
  ``<db>.faiss`` holds the index's ids and vectors together with the DB state it was built from,
  in one file written atomically (``persist.py``; no FAISS deserialiser runs on it). It is
  trusted only when that state, the row count and a checksum of the ids match the DB; otherwise
  it is rebuilt from the DB with a one-line note on stderr. Within a process the index follows
  other processes' writes incrementally (new ids) or by rebuild (``embed_epoch`` changes on
  deletes and re-embeddings).
* The in-memory index changes inside a write transaction are logged and undone when the
  transaction rolls back, so the index never holds a row the DB does not.
* Insert merges near-duplicates: the same name, or an embedding whose cosine similarity with a
  stored one is at least ``merge_threshold``; the merge keeps the clearer instruction
  (``behavior.clearer``), adds the provenance and sums the counters.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from metareason.plugins.behaviors.behavior import Behavior, Provenance, clearer
from metareason.plugins.behaviors.jsonl import MAX_IMPORT_BYTES, read_jsonl, write_jsonl
from metareason.plugins.behaviors.persist import (HandbookError, IndexFileError, ids_digest, read_index_file,
                                                  write_index_file)

__all__ = ["Handbook", "HandbookError", "InsertReport", "open_handbook", "read_jsonl"]

APPLICATION_ID = 0x4D524248  # "MRBH": metareason behavior handbook
SCHEMA_VERSION = 2
SQLITE_MAGIC = b"SQLite format 3\x00"

#: schema version -> statements that bring version-1 to it. v1: behaviors + provenance + meta;
#: v2: the cited-in-a-correct-answer counter, and every topic a behavior was extracted under (a
#: merged behavior serves all of them in topic retrieval; ``behaviors.topic`` is the first).
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE behaviors (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            instruction TEXT NOT NULL,
            topic TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            retrieved INTEGER NOT NULL DEFAULT 0,
            cited INTEGER NOT NULL DEFAULT 0,
            embedding BLOB NOT NULL)""",
        """CREATE TABLE provenance (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            behavior_id INTEGER NOT NULL REFERENCES behaviors(id) ON DELETE CASCADE,
            example_id TEXT, trace_hash TEXT, generator TEXT, created REAL NOT NULL)""",
        """CREATE INDEX provenance_behavior ON provenance(behavior_id)""",
    ],
    2: [
        """ALTER TABLE behaviors ADD COLUMN cited_correct INTEGER NOT NULL DEFAULT 0""",
        """CREATE TABLE behavior_topics (
            behavior_id INTEGER NOT NULL REFERENCES behaviors(id) ON DELETE CASCADE,
            topic TEXT NOT NULL, PRIMARY KEY (topic, behavior_id))""",
        """INSERT INTO behavior_topics(behavior_id, topic) SELECT id, topic FROM behaviors WHERE topic IS NOT NULL""",
    ],
}


@dataclass
class InsertReport:
    inserted: int = 0
    merged: int = 0
    names: list[str] = field(default_factory=list)  # stored name of each input, in order


def _embed_text(name: str, instruction: str) -> str:
    return f"{name[len('behavior_'):].replace('_', ' ')}: {instruction}"


class Handbook:
    """A behavior handbook at ``path`` (created when absent). Use as a context manager or call
    ``close()``: the FAISS index is written then (when it changed)."""

    def __init__(self, path: Union[str, Path], embedder: Union[str, object] = "minilm",
                 merge_threshold: float = 0.92, max_sentences: int = 2, busy_timeout_s: float = 120.0,
                 create: bool = True):
        self.path = Path(path)
        self.index_path = Path(str(self.path) + ".faiss")
        self.index_meta_path = Path(str(self.path) + ".faiss.json")  # the two-file format of earlier versions
        self.merge_threshold, self.max_sentences = merge_threshold, max_sentences
        self._embedder_spec = embedder
        self._embedder = None if isinstance(embedder, str) else embedder
        self._index = None
        self._index_state: tuple[int, int] = (-1, -1)  # (embed_epoch, max_id) the index holds
        self._index_dirty = False
        self._undo: Optional[list] = None  # index changes of the open write transaction
        self._check_file(create)
        self.db = self._connect(busy_timeout_s)
        self._init_schema()

    # ------------------------------------------------------------------ opening
    def _fail(self, why: str) -> "HandbookError":
        return HandbookError(f"{self.path}: {why}; the file was left untouched")

    def _check_file(self, create: bool) -> None:
        if self.path.is_dir():
            raise HandbookError(f"{self.path}: is a directory, expected a handbook file (behaviors.handbook)")
        if not self.path.exists():
            if not create:
                raise HandbookError(f"{self.path}: no such handbook")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        if self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            head = f.read(16)
        if head != SQLITE_MAGIC:
            raise self._fail("not a behavior handbook (not a SQLite database)")

    def _connect(self, busy_timeout_s: float) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            app = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app != APPLICATION_ID and tables:
                db.close()
                raise self._fail("a SQLite database of another program, not a behavior handbook")
            if tables:
                ok = db.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    db.close()
                    raise self._fail(f"damaged handbook ({ok})")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            raise self._fail(f"damaged or not a handbook ({exc})") from None
        return db

    def _init_schema(self) -> None:
        try:
            with self._write():
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise self._fail(f"schema version {version} is newer than this metareason's "
                                     f"({SCHEMA_VERSION}); upgrade metareason")
                if version == 0:
                    self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in MIGRATIONS[v]:
                        self.db.execute(stmt)
                    self.db.execute(f"PRAGMA user_version = {v}")
                for key, value in (("embed_epoch", "0"), ("created", str(time.time()))):
                    self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
        except sqlite3.DatabaseError as exc:
            raise self._fail(f"damaged or not a handbook ({exc})") from None

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return False
                except BaseException:
                    self._rollback()
                    raise
            self._rollback()
            return False

        def _rollback(self) -> None:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")

    def _write(self) -> "_Tx":
        """A write transaction holding the database's write lock from its start."""
        return Handbook._Tx(self.db)

    # ------------------------------------------------------------------ embeddings and index
    @property
    def embedder(self):
        if self._embedder is None:
            from metareason.plugins.behaviors.embedder import get_embedder

            self._embedder = get_embedder(self._embedder_spec)
        return self._embedder

    def _meta(self, key: str, default: Optional[str] = None) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value))

    def _db_state(self) -> tuple[int, int, int]:
        epoch = int(self._meta("embed_epoch", "0"))
        max_id, count = self.db.execute("SELECT coalesce(max(id), 0), count(*) FROM behaviors").fetchone()
        return epoch, int(max_id), int(count)

    def _check_embedder(self) -> None:
        """Within a write transaction: the DB records which embedder made its vectors; a different
        one re-embeds every row (and bumps the epoch, so every index is rebuilt)."""
        stored = self._meta("embedder")
        emb = self.embedder
        if stored == emb.name:
            return
        rows = self.db.execute("SELECT id, name, instruction FROM behaviors").fetchall()
        if rows:
            vecs = emb.encode([_embed_text(n, i) for _, n, i in rows])
            self.db.executemany("UPDATE behaviors SET embedding = ? WHERE id = ?",
                                [(v.tobytes(), r[0]) for v, r in zip(vecs, rows)])
            self._bump_epoch()
        self._set_meta("embedder", emb.name)
        self._set_meta("dim", str(emb.dim))

    def _bump_epoch(self) -> None:
        self._set_meta("embed_epoch", str(int(self._meta("embed_epoch", "0")) + 1))

    def _new_index(self):
        import faiss

        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim))

    def _rows_to_index(self, index, where: str = "", args: tuple = ()) -> None:
        rows = self.db.execute(f"SELECT id, embedding FROM behaviors {where} ORDER BY id", args).fetchall()
        if rows:
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vecs = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            self._index_add(index, ids, vecs)

    # The index is changed only through these two, which log each change while a write
    # transaction is open; ``_index_tx`` undoes the log when the transaction rolls back.
    def _index_add(self, index, ids: np.ndarray, vecs: np.ndarray) -> None:
        index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        if self._undo is not None:
            self._undo.append(("add", index, np.array(ids, dtype=np.int64)))

    def _index_replace(self, bid: int, vec: np.ndarray) -> None:
        ids = np.array([bid], dtype=np.int64)
        old = self._index.reconstruct(int(bid))
        self._index.remove_ids(ids)
        self._index.add_with_ids(vec[None, :].astype(np.float32), ids)
        if self._undo is not None:
            self._undo.append(("replace", self._index, ids, old))

    @contextmanager
    def _index_tx(self):
        """A write transaction whose index changes roll back with it: on an exception (in the
        body or at COMMIT) the in-memory index, its state and dirty flag are what they were."""
        saved = (self._index, self._index_state, self._index_dirty)
        self._undo = []
        try:
            with self._write():
                yield
        except BaseException:
            self._rollback_index(saved, self._undo)
            raise
        finally:
            self._undo = None

    def _rollback_index(self, saved: tuple, undo: list) -> None:
        index, state, dirty = saved
        try:
            for op in reversed(undo):
                if op[1] is not index:
                    continue  # an index built inside the transaction: dropped with it
                if op[0] == "add":
                    index.remove_ids(op[2])
                else:
                    index.remove_ids(op[2])
                    index.add_with_ids(op[3][None, :], op[2])
        except Exception:  # noqa: BLE001 - cannot undo: rebuild from the DB on next use
            index, state = None, (-1, -1)
        self._index, self._index_state, self._index_dirty = index, state, dirty

    def _db_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT id FROM behaviors ORDER BY id")], dtype=np.int64)

    def _index_note(self, why: str) -> None:
        print(f"[behaviors] {self.index_path}: {why}; rebuilt from the handbook", file=sys.stderr, flush=True)

    def _load_persisted(self, state: tuple[int, int, int]):
        """The persisted index when it verifies against the DB (state, count, checksum of the
        ids), else None (after a note saying why, unless there is no file)."""
        try:
            head, ids, vecs = read_index_file(self.index_path)
        except FileNotFoundError:
            return None
        except (OSError, IndexFileError) as exc:
            self._index_note(str(exc))
            return None
        epoch, max_id, count = state
        if head["embedder"] != self.embedder.name or head["dim"] != self.embedder.dim:
            why = f"built with embedder {head['embedder']}, the handbook uses {self.embedder.name}"
        elif (head["embed_epoch"], head["max_id"], head["count"]) != (epoch, max_id, count):
            why = (f"stale (built for {head['count']} behaviors up to id {head['max_id']}, epoch {head['embed_epoch']}; "
                   f"the handbook has {count} up to id {max_id}, epoch {epoch})")
        elif head["ids_sha256"] != ids_digest(self._db_ids()):
            why = "its ids do not match the handbook's (checksum)"
        else:
            index = self._new_index()
            if len(ids):
                index.add_with_ids(vecs, ids)
            return index
        self._index_note(why)
        return None

    def _sync_index(self) -> None:
        """Bring the in-memory index up to the DB (call inside a transaction or read snapshot)."""
        epoch, max_id, count = state = self._db_state()
        if self._index is not None and self._index_state == (epoch, max_id):
            return
        if self._index is not None and self._index_state[0] == epoch and max_id > self._index_state[1]:
            self._rows_to_index(self._index, "WHERE id > ?", (self._index_state[1],))
            self._index_dirty = True
        else:
            index = self._load_persisted(state) if self._index is None else None
            if index is None:
                index = self._new_index()
                self._rows_to_index(index)
                self._index_dirty = True
            self._index = index
        self._index_state = (epoch, max_id)

    def _ensure_ready(self) -> None:
        if self._meta("embedder") != self.embedder.name:
            with self._write():
                self._check_embedder()

    def _index_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        n, d = self._index.ntotal, self._index.d
        vecs = self._index.index.reconstruct_n(0, n) if n else np.zeros((0, d), dtype=np.float32)
        return ids, vecs

    def save_index(self) -> None:
        """Write ``<db>.faiss`` (ids, vectors and the DB state they match, one file) atomically:
        temp file, fsync, rename, fsync of the directory. Only an index that matches the DB (state,
        count, checksum of the ids) is written."""
        if self._index is None or not self._index_dirty:
            return
        self.db.execute("BEGIN")  # one read snapshot for the state and the ids
        try:
            epoch, max_id, count = self._db_state()
            db_ids = self._db_ids() if (epoch, max_id) == self._index_state else None
        finally:
            self.db.execute("COMMIT")
        if db_ids is None:
            return  # another process wrote since; whoever opens next rebuilds or follows
        ids, vecs = self._index_arrays()
        if len(ids) != count or ids_digest(ids) != ids_digest(db_ids):
            print(f"[behaviors] {self.index_path}: the in-memory index does not match the handbook; not saved",
                  file=sys.stderr, flush=True)
            self._index = None
            return
        write_index_file(self.index_path, ids, vecs, {"embed_epoch": epoch, "max_id": max_id, "count": count,
                                                      "embedder": self.embedder.name, "dim": self.embedder.dim})
        if self.index_meta_path.exists():
            self.index_meta_path.unlink()
        self._index_dirty = False

    def close(self) -> None:
        if getattr(self, "db", None) is None:
            return
        try:
            self.save_index()
        finally:
            self.db.close()
            self.db = None

    def __enter__(self) -> "Handbook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def add(self, behavior: Behavior) -> InsertReport:
        return self.add_many([behavior])

    def add_many(self, behaviors: Sequence[Behavior]) -> InsertReport:
        """Insert (or merge) each behavior; one transaction for the whole batch."""
        for b in behaviors:
            b.validate(self.max_sentences)
        report = InsertReport()
        if not behaviors:
            return report
        vecs = self.embedder.encode([_embed_text(b.name, b.instruction) for b in behaviors])
        now = time.time()
        with self._index_tx():
            self._check_embedder()
            self._sync_index()
            for b, vec in zip(behaviors, vecs):
                target = self._duplicate_of(b.name, vec)
                if target is None:
                    cur = self.db.execute(
                        "INSERT INTO behaviors(name, instruction, topic, created, updated, retrieved, cited, "
                        "cited_correct, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (b.name, b.instruction, b.topic, b.created, now, b.retrieved, b.cited, b.cited_correct,
                         vec.tobytes()))
                    bid = cur.lastrowid
                    self._add_topics(bid, b)
                    self._index_add(self._index, np.array([bid], dtype=np.int64), vec[None, :])
                    self._index_state = (self._index_state[0], bid)
                    report.inserted += 1
                    report.names.append(b.name)
                else:
                    bid = target
                    report.merged += 1
                    report.names.append(self._merge_into(bid, b, vec, now))
                    self._add_topics(bid, b)
                self.db.executemany(
                    "INSERT INTO provenance(behavior_id, example_id, trace_hash, generator, created) VALUES (?, ?, ?, ?, ?)",
                    [(bid, p.example_id, p.trace_hash, p.generator, p.created) for p in b.provenance])
            self._index_dirty = True
        return report

    def _add_topics(self, bid: int, b: Behavior) -> None:
        topics = [t for t in [b.topic, *b.topics] if t is not None]
        self.db.executemany("INSERT OR IGNORE INTO behavior_topics(behavior_id, topic) VALUES (?, ?)",
                            [(bid, t) for t in dict.fromkeys(topics)])

    def _duplicate_of(self, name: str, vec: np.ndarray) -> Optional[int]:
        row = self.db.execute("SELECT id FROM behaviors WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        if self._index.ntotal == 0:
            return None
        scores, ids = self._index.search(vec[None, :], 1)
        return int(ids[0, 0]) if scores[0, 0] >= self.merge_threshold else None

    def _merge_into(self, bid: int, b: Behavior, vec: np.ndarray, now: float) -> str:
        name, instruction = self.db.execute("SELECT name, instruction FROM behaviors WHERE id = ?", (bid,)).fetchone()
        keep = clearer(instruction, b.instruction, self.max_sentences)
        self.db.execute("UPDATE behaviors SET retrieved = retrieved + ?, cited = cited + ?, "
                        "cited_correct = cited_correct + ?, created = min(created, ?), updated = ?, "
                        "topic = coalesce(topic, ?) WHERE id = ?",
                        (b.retrieved, b.cited, b.cited_correct, b.created, now, b.topic, bid))
        if keep != instruction:
            new_vec = self.embedder.encode([_embed_text(name, keep)])[0]
            self.db.execute("UPDATE behaviors SET instruction = ?, embedding = ? WHERE id = ?",
                            (keep, new_vec.tobytes(), bid))
            self._index_replace(bid, new_vec)
            self._bump_epoch()  # other processes' indexes hold the old vector: they rebuild
            self._index_state = (self._index_state[0] + 1, self._index_state[1])
        return name

    def record_retrieved(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        with self._write():
            self.db.executemany("UPDATE behaviors SET retrieved = retrieved + ? WHERE name = ?",
                                [(n, name) for name, n in counts.items()])

    def record_citations(self, cited: dict[str, int], cited_correct: dict[str, int]) -> None:
        names = set(cited) | set(cited_correct)
        if not names:
            return
        with self._write():
            self.db.executemany("UPDATE behaviors SET cited = cited + ?, cited_correct = cited_correct + ? WHERE name = ?",
                                [(cited.get(n, 0), cited_correct.get(n, 0), n) for n in names])

    def prune(self, min_cited: int, older_than_days: float, now: Optional[float] = None) -> list[str]:
        """Delete behaviors cited fewer than ``min_cited`` times and created more than
        ``older_than_days`` days ago; returns their names."""
        cutoff = (now if now is not None else time.time()) - older_than_days * 86400.0
        with self._write():
            rows = self.db.execute("SELECT id, name FROM behaviors WHERE cited < ? AND created < ? ORDER BY id",
                                   (min_cited, cutoff)).fetchall()
            if rows:
                self.db.executemany("DELETE FROM behaviors WHERE id = ?", [(r[0],) for r in rows])
                self._bump_epoch()
        self._index = None  # rebuilt on the next search
        return [r[1] for r in rows]

    # ------------------------------------------------------------------ reading
    _COLS = "id, name, instruction, topic, created, retrieved, cited, cited_correct"

    def _row(self, r: tuple, provenance: bool = False) -> Behavior:
        b = Behavior(id=r[0], name=r[1], instruction=r[2], topic=r[3], created=r[4], retrieved=r[5], cited=r[6],
                     cited_correct=r[7])
        if provenance:
            b.topics = [t for (t,) in self.db.execute(
                "SELECT topic FROM behavior_topics WHERE behavior_id = ? ORDER BY rowid", (r[0],)) if t != b.topic]
            b.provenance = [Provenance(*p) for p in self.db.execute(
                "SELECT example_id, trace_hash, generator, created FROM provenance WHERE behavior_id = ? ORDER BY id",
                (r[0],))]
        return b

    def __len__(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM behaviors").fetchone()[0])

    def names(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM behaviors")}

    def get(self, name: str, provenance: bool = True) -> Optional[Behavior]:
        r = self.db.execute(f"SELECT {self._COLS} FROM behaviors WHERE name = ?", (name,)).fetchone()
        return None if r is None else self._row(r, provenance)

    def all(self, topic: Optional[str] = None, provenance: bool = False, order: str = "id") -> list[Behavior]:
        orders = {"id": "id", "cited": "cited DESC, id", "retrieved": "retrieved DESC, id", "name": "name"}
        where, args = (("WHERE id IN (SELECT behavior_id FROM behavior_topics WHERE topic = ?)", (topic,))
                       if topic is not None else ("", ()))
        rows = self.db.execute(f"SELECT {self._COLS} FROM behaviors {where} ORDER BY {orders[order]}", args).fetchall()
        return [self._row(r, provenance) for r in rows]

    def by_topic(self, topic: str, k: int) -> list[Behavior]:
        """Topic retrieval (the paper's MATH setting): the topic's K most useful behaviors (cited in
        correct answers, then cited, then oldest), in insertion order, so a block does not
        reshuffle as counters grow."""
        rows = self.db.execute(f"SELECT {self._COLS} FROM behaviors WHERE id IN "
                               "(SELECT behavior_id FROM behavior_topics WHERE topic = ?) "
                               "ORDER BY cited_correct DESC, cited DESC, id LIMIT ?", (topic, k)).fetchall()
        return [self._row(r) for r in sorted(rows, key=lambda r: r[0])]

    def search(self, query: str, k: int) -> list[tuple[Behavior, float]]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int) -> list[list[tuple[Behavior, float]]]:
        """Embedding top-K (the paper's AIME setting) for each query: (behavior, cosine)."""
        self._ensure_ready()
        vecs = self.embedder.encode(list(queries))
        return self.search_vectors(vecs, k)

    def search_vectors(self, vecs: np.ndarray, k: int) -> list[list[tuple[Behavior, float]]]:
        self.db.execute("BEGIN")  # one read snapshot for the sync and the row look-up
        try:
            self._sync_index()
            if self._index.ntotal == 0:
                return [[] for _ in range(len(vecs))]
            scores, ids = self._index.search(np.ascontiguousarray(vecs, dtype=np.float32), min(k, self._index.ntotal))
            wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
            rows = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start: start + 500]
                for r in self.db.execute(f"SELECT {self._COLS} FROM behaviors WHERE id IN "
                                         f"({','.join('?' * len(chunk))})", chunk):
                    rows[r[0]] = r
        finally:
            self.db.execute("COMMIT")
        return [[(self._row(rows[int(i)]), float(s)) for s, i in zip(srow, irow) if int(i) in rows]
                for srow, irow in zip(scores, ids)]

    def index_search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS part of a search alone: ``(scores, ids)`` of the top ``k`` per row of ``vecs``
        (id -1 where fewer), on the index as the last search left it (no sync with the DB)."""
        if self._index is None:
            raise HandbookError(f"{self.path}: no index yet (run a search first)")
        return self._index.search(np.ascontiguousarray(vecs, dtype=np.float32), k)

    def rows(self, ids: Sequence[int]) -> list[tuple]:
        """The SQL part of a search alone: the DB rows of behavior ids ``ids``."""
        ids = [int(i) for i in ids]
        return self.db.execute(f"SELECT {self._COLS} FROM behaviors WHERE id IN ({','.join('?' * len(ids))})",
                               ids).fetchall()

    def stats(self) -> dict:
        n, retrieved, cited, correct = self.db.execute(
            "SELECT count(*), coalesce(sum(retrieved),0), coalesce(sum(cited),0), coalesce(sum(cited_correct),0) "
            "FROM behaviors").fetchone()
        topics = {t: c for t, c in self.db.execute(
            "SELECT topic, count(*) FROM behavior_topics GROUP BY topic ORDER BY count(*) DESC, topic")}
        top = [(r[0], r[1], r[2]) for r in self.db.execute(
            "SELECT name, cited, cited_correct FROM behaviors ORDER BY cited DESC, id LIMIT 10")]
        return {"handbook": str(self.path), "behaviors": n, "provenance_records":
                self.db.execute("SELECT count(*) FROM provenance").fetchone()[0],
                "retrieved": retrieved, "cited": cited, "cited_correct": correct, "topics": topics,
                "most_cited": [{"name": a, "cited": b, "cited_correct": c} for a, b, c in top],
                "schema_version": self.db.execute("PRAGMA user_version").fetchone()[0],
                "embedder": self._meta("embedder")}

    # ------------------------------------------------------------------ JSONL
    def export_jsonl(self, out: Union[str, Path]) -> int:
        """Every behavior with its provenance, one per line; written atomically."""
        return write_jsonl(out, self.all(provenance=True))

    def import_jsonl(self, path: Union[str, Path], max_bytes: int = MAX_IMPORT_BYTES) -> InsertReport:
        """Every line is read and validated before anything is written (an error names file and
        line), then all of them go in as one transaction."""
        return self.add_many(read_jsonl(path, self.max_sentences, max_bytes))


def open_handbook(section, create: bool = True) -> Handbook:
    """The handbook of a ``behaviors:`` config section."""
    return Handbook(os.path.expanduser(section.handbook), embedder=section.embedder,
                    merge_threshold=section.merge_threshold, max_sentences=section.max_instruction_sentences,
                    create=create)
