"""The handbook under bad input and faults (issue 34): JSONL import checks every field with
``file:line`` errors and writes nothing on error; index changes roll back with the transaction;
``<db>.faiss`` is one atomically written file (index + the DB state it matches), verified against
the DB before it is trusted, else rebuilt with a note."""
import json
import os

import numpy as np
import pytest

from metareason.plugins.behaviors import persist
from metareason.plugins.behaviors.behavior import Behavior, Provenance
from metareason.plugins.behaviors.persist import ids_digest, read_index_file, write_index_file
from metareason.plugins.behaviors.store import Handbook, HandbookError


def B(name, instruction, topic=None, **kw):
    return Behavior(name, instruction, topic=topic, **kw)


GOOD = {"name": "behavior_good", "instruction": "A fine rule.", "provenance": [{"example_id": "e1", "created": 5.0}]}


@pytest.fixture
def hb(tmp_path):
    h = Handbook(tmp_path / "hb.db", embedder="hashing")
    yield h
    h.close()


def db_ids(h):
    return sorted(r[0] for r in h.db.execute("SELECT id FROM behaviors"))


def index_ids(h):
    import faiss

    return sorted(int(i) for i in faiss.vector_to_array(h._index.id_map))


# ------------------------------------------------------------------ import: every field, file:line
BAD_LINES = [
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": [{"example_id": 3}]}',
     r"provenance\[0\]\.example_id: expected text, got 3"),
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": [{"generator": ["g"]}]}',
     r"provenance\[0\]\.generator: expected text"),
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": [{"trace_hash": {}}]}',
     r"provenance\[0\]\.trace_hash: expected text"),
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": [{"created": "yesterday"}]}',
     r"provenance\[0\]\.created: expected a UNIX time"),
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": [{"created": 1e400}]}',
     r"provenance\[0\]\.created: inf is out of range"),
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": "e1"}', r"provenance: expected a list of objects"),
    ('{"name": "behavior_x", "instruction": "Rule.", "provenance": [{"example": "e1"}]}',
     r"provenance\[0\]\.example: unknown field"),
    ('{"name": "behavior_x", "instruction": "Rule.", "created": NaN}', r"invalid JSON|NaN is not a number"),
    ('{"name": "behavior_x", "instruction": "Rule.", "created": -Infinity}', r"-Infinity is not a number"),
    ('{"name": "behavior_x", "instruction": "Rule.", "created": 1e999}', r"created: inf is out of range"),
    ('{"name": "behavior_x", "instruction": "Rule.", "created": -1}', r"created: -1 is out of range"),
    ('{"name": "behavior_x", "instruction": "Rule.", "created": true}', r"created: expected a UNIX time"),
    ('{"name": "behavior_x", "instruction": "Rule.", "cited": 18446744073709551616}',
     r"cited: 18446744073709551616 is out of range \(0 to 2\*\*63-1\)"),
    ('{"name": "behavior_x", "instruction": "Rule.", "retrieved": 9223372036854775808}', r"retrieved: .* out of range"),
    ('{"name": "behavior_x", "instruction": "Rule.", "cited_correct": 1.5}', r"cited_correct: expected a non-negative"),
    ('{"name": "behavior_x", "instruction": "Rule.", "cited": ' + "9" * 5000 + "}", r"a number with too many digits"),
    ('{"name": "behavior_x", "instruction": "Rule \\ud800."}', r"instruction: not valid Unicode"),
    ('{"name": "behavior_x", "instruction": "Rule.", "topic": "t\\udfff"}', r"topic: not valid Unicode"),
    ('{"name": "behavior_x", "instruction": "Rule.", "topics": "algebra"}', r"topics: expected a list of text"),
    ('{"name": "behavior_x", "instruction": "Rule.", "topics": ["a", 2]}', r"topics\[1\]: expected text"),
    ('{"name": "behavior_x", "instruction": "Rule.", "name": "behavior_y"}', r"name: duplicate key"),
    ('{"name": 7, "instruction": "Rule."}', r"name: 7 is not behavior_"),
    ('{"name": "behavior_x", "instruction": "Rule.", "extra": 1}', r"extra: unknown field"),
    ('[' * 100000 + ']' * 100000, r"nested too deeply|expected an object"),
    ('{"name": "behavior_x", "instruction": "Rule."', r"invalid JSON \(.* at column \d+\)"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[f"bad{i}" for i in range(len(BAD_LINES))])
def test_import_checks_every_field_names_file_line_and_writes_nothing(tmp_path, hb, line, message):
    hb.add(B("behavior_kept", "Kept rule about apples."))
    hb.save_index()
    before = (tmp_path / "hb.db.faiss").read_bytes()
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n", encoding="utf-8", errors="surrogatepass")
    with pytest.raises(HandbookError, match=message) as info:
        hb.import_jsonl(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: ") and "\n" not in msg
    assert hb.names() == {"behavior_kept"} and index_ids(hb) == db_ids(hb)
    hb.close()
    assert (tmp_path / "hb.db.faiss").read_bytes() == before


def test_import_non_utf8_line_is_a_file_line_error(tmp_path, hb):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"name": "behavior_x", "instruction": "Caf\xe9."}'.encode("latin-1"))
    with pytest.raises(HandbookError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 43\)"):
        hb.import_jsonl(path)
    assert len(hb) == 0


def test_import_size_limit_refuses_before_parsing(tmp_path, hb):
    path = tmp_path / "big.jsonl"
    path.write_text((json.dumps(GOOD) + "\n") * 50)
    with pytest.raises(HandbookError, match=r"big.jsonl: larger than the import limit of 1000 bytes"):
        hb.import_jsonl(path, max_bytes=1000)
    assert len(hb) == 0
    assert hb.import_jsonl(path, max_bytes=path.stat().st_size).merged == 49  # at the limit: accepted


def test_import_accepts_a_byte_order_mark_and_crlf(tmp_path, hb):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n")
    assert hb.import_jsonl(path).inserted == 1
    assert hb.get("behavior_good").provenance == [Provenance("e1", None, None, 5.0)]


def test_cli_import_error_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    path = tmp_path / "bad.jsonl"
    path.write_text('{"name": "behavior_x", "instruction": "Rule.", "created": NaN}\n')
    proc = subprocess.run([sys.executable, "-m", "metareason", "behaviors", "import", str(path),
                           "--handbook", str(tmp_path / "hb.db"), "--embedder", "hashing"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {path}:1: NaN is not a number (JSON has no NaN or Infinity)"]


def test_export_is_atomic_and_round_trips_checked_fields(tmp_path, hb, monkeypatch):
    hb.add(B("behavior_a", "Alpha rule.", "t", provenance=[Provenance("e1", "h", "g", 3.0)]))
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(persist.os, "replace", crash)
    with pytest.raises(OSError):
        hb.export_jsonl(out)
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) .count("out.jsonl") == 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    monkeypatch.undo()
    assert hb.export_jsonl(out) == 1
    with Handbook(tmp_path / "other.db", embedder="hashing") as h2:
        h2.import_jsonl(out)
        assert h2.get("behavior_a").provenance == [Provenance("e1", "h", "g", 3.0)]


# ------------------------------------------------------------------ the index rolls back with the transaction
def fail_on_call(monkeypatch, hb, n):
    """Make the n-th ``_add_topics`` of ``hb`` raise (a fault in the middle of a write)."""
    real, calls = hb._add_topics, []

    def faulty(bid, b):
        calls.append(b.name)
        if len(calls) == n:
            raise RuntimeError("injected fault")
        return real(bid, b)

    monkeypatch.setattr(hb, "_add_topics", faulty)


def test_failed_insert_batch_rolls_the_index_back(hb, monkeypatch):
    hb.add(B("behavior_apples", "Alpha rule about apples."))
    state = hb._index_state
    fail_on_call(monkeypatch, hb, 2)
    with pytest.raises(RuntimeError, match="injected fault"):
        hb.add_many([B("behavior_bananas", "Beta rule about bananas."), B("behavior_cherries", "Gamma rule.")])
    assert hb.names() == {"behavior_apples"}
    assert hb._index.ntotal == 1 and index_ids(hb) == db_ids(hb) and hb._index_state == state
    monkeypatch.undo()
    hb.add(B("behavior_dates", "Delta rule about dates."))
    assert index_ids(hb) == db_ids(hb)
    assert [b.name for b, _ in hb.search("bananas", 5)] != [] and "behavior_bananas" not in {
        b.name for b, _ in hb.search("bananas", 5)}


def test_failed_merge_restores_the_replaced_vector(hb, monkeypatch):
    hb.add(B("behavior_rev", "Reverse the digits of the number one by one before adding"))
    bid = hb.get("behavior_rev").id
    old = hb._index.reconstruct(bid).copy()
    fail_on_call(monkeypatch, hb, 1)  # the merge's topic insert fails after the vector was replaced
    with pytest.raises(RuntimeError):
        hb.add(B("behavior_rev", "Reverse the digits."))  # clearer: the merge re-embeds
    assert hb.get("behavior_rev").instruction == "Reverse the digits of the number one by one before adding"
    stored = np.frombuffer(hb.db.execute("SELECT embedding FROM behaviors WHERE id = ?", (bid,)).fetchone()[0],
                           dtype=np.float32)
    assert np.array_equal(hb._index.reconstruct(bid), old) and np.array_equal(old, stored)


class CommitFails:
    """A connection whose next COMMIT fails (disk full at commit time)."""

    def __init__(self, db):
        self.db, self.armed = db, True

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise __import__("sqlite3").OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_failed_commit_rolls_back_db_and_index(hb):
    hb.add(B("behavior_apples", "Alpha rule about apples."))
    real = hb.db
    hb.db = CommitFails(real)
    with pytest.raises(Exception, match="disk is full"):
        hb.add(B("behavior_bananas", "Beta rule about bananas."))
    hb.db = real
    assert not real.in_transaction
    assert hb.names() == {"behavior_apples"} and index_ids(hb) == db_ids(hb)


def test_rolled_back_id_reused_by_another_writer_is_not_served_stale(tmp_path, monkeypatch):
    path = tmp_path / "hb.db"
    a = Handbook(path, embedder="hashing", merge_threshold=1.01)
    b = Handbook(path, embedder="hashing", merge_threshold=1.01)
    a.add(B("behavior_apples", "Alpha rule about apples."))
    fail_on_call(monkeypatch, a, 1)
    with pytest.raises(RuntimeError):
        a.add(B("behavior_zebras", "Zeta rule about zebras and stripes."))
    monkeypatch.undo()
    b.add(B("behavior_kiwis", "Kappa rule about kiwis."))  # gets the id the failed insert had
    top = a.search("Kappa rule about kiwis.", 1)[0]
    assert top[0].name == "behavior_kiwis"
    assert top[1] == pytest.approx(b.search("Kappa rule about kiwis.", 1)[0][1])  # kiwis' vector, not zebras'
    assert index_ids(a) == db_ids(a)
    a.close()
    b.close()


# ------------------------------------------------------------------ one index file, written atomically
def test_index_and_its_state_are_one_file_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "hb.db"
    (tmp_path / "hb.db.faiss.json").write_text("{}")  # the two-file format of earlier versions
    with Handbook(path, embedder="hashing") as h:
        h.add_many([B("behavior_a", "Alpha rule about apples."), B("behavior_b", "Beta rule about bananas.")])
    assert sorted(os.listdir(tmp_path)) == ["hb.db", "hb.db.faiss"] or "hb.db.faiss.json" not in os.listdir(tmp_path)
    head, ids, vecs = read_index_file(tmp_path / "hb.db.faiss")
    assert (head["count"], head["max_id"], sorted(ids.tolist())) == (2, 2, [1, 2]) and vecs.shape == (2, 256)
    before = (tmp_path / "hb.db.faiss").read_bytes()

    def crash(*a, **k):
        raise OSError("killed before the rename")

    with Handbook(path, embedder="hashing") as h:
        h.add(B("behavior_c", "Gamma rule about cherries."))
        monkeypatch.setattr(persist.os, "replace", crash)
        with pytest.raises(OSError):
            h.save_index()
        monkeypatch.undo()
        h._index_dirty = False  # the "crashed" writer does not save on close
    assert (tmp_path / "hb.db.faiss").read_bytes() == before  # old index + old state, intact together
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    with Handbook(path, embedder="hashing") as h:
        assert h.search("cherries", 1)[0][0].name == "behavior_c"  # stale: rebuilt


def test_index_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(persist.os, "fsync", spy)
    with Handbook(tmp_path / "hb.db", embedder="hashing") as h:
        h.add(B("behavior_a", "Alpha rule about apples."))
    assert any(p.startswith(str(tmp_path / ".hb.db.faiss.tmp-")) for p in synced), synced  # the data, before the rename
    assert str(tmp_path) in synced  # the rename itself


def test_faiss_deserialiser_never_runs_on_the_file(tmp_path, monkeypatch, capsys):
    import faiss

    path = tmp_path / "hb.db"
    with Handbook(path, embedder="hashing") as h:
        h.add_many([B("behavior_a", "Alpha rule about apples."), B("behavior_b", "Beta rule about bananas.")])
    monkeypatch.setattr(faiss, "read_index", lambda *a: pytest.fail("faiss.read_index called"))
    with Handbook(path, embedder="hashing") as h:
        assert h.search("bananas", 1)[0][0].name == "behavior_b" and not h._index_dirty  # loaded, not rebuilt
    monkeypatch.undo()
    idx = faiss.IndexIDMap2(faiss.IndexFlatIP(256))  # an old-format file (or anyone's FAISS file)
    faiss.write_index(idx, str(tmp_path / "hb.db.faiss"))
    with Handbook(path, embedder="hashing") as h:
        assert h.search("bananas", 1)[0][0].name == "behavior_b" and h._index_dirty
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"[behaviors] {path}.faiss: not a handbook index (another format, e.g. one written by an older "
                   f"metareason); rebuilt from the handbook"]


# ------------------------------------------------------------------ verified against the DB before it is trusted
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "hb.db"
    with Handbook(path, embedder="hashing") as h:
        h.add_many([B("behavior_a", "Alpha rule about apples."), B("behavior_b", "Beta rule about bananas."),
                    B("behavior_c", "Gamma rule about cherries.")])
    return path


def reopen_and_check(path, capsys, why):
    with Handbook(path, embedder="hashing") as h:
        assert h.search("bananas", 1)[0][0].name == "behavior_b"
        assert h._index_dirty  # rebuilt, and saved again on close
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"[behaviors] {path}.faiss: ") and why in err[0], err
    assert err[0].endswith("; rebuilt from the handbook")
    with Handbook(path, embedder="hashing") as h:  # the rewritten file verifies
        h.search("bananas", 1)
        assert not h._index_dirty
    assert capsys.readouterr().err == ""


def test_index_with_forged_ids_is_rebuilt(saved, capsys):
    head, ids, vecs = read_index_file(str(saved) + ".faiss")
    ids = np.array([0, 2, 3])  # same count and max id, not the DB's ids; vectors point elsewhere
    state = {k: head[k] for k in ("embed_epoch", "max_id", "embedder", "dim")}
    write_index_file(str(saved) + ".faiss", ids, vecs[::-1], dict(state, count=3))
    assert read_index_file(str(saved) + ".faiss")[0]["ids_sha256"] == ids_digest(ids)  # well-formed, checksummed
    reopen_and_check(saved, capsys, "ids do not match the handbook")


def test_index_with_another_count_is_rebuilt(saved, capsys):
    head, ids, vecs = read_index_file(str(saved) + ".faiss")
    state = {k: head[k] for k in ("embed_epoch", "max_id", "embedder", "dim")}
    write_index_file(str(saved) + ".faiss", ids[:2], vecs[:2], dict(state, count=2))
    reopen_and_check(saved, capsys, "stale (built for 2 behaviors")


@pytest.mark.parametrize("damage,why", [
    (lambda raw: raw[:-7], "damaged (size"),
    (lambda raw: raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:], "damaged (payload checksum mismatch)"),
    (lambda raw: raw[:12] + b"x" + raw[13:], "damaged (unreadable header)"),
    (lambda raw: b"", "not a handbook index"),
])
def test_damaged_index_file_is_rebuilt(saved, capsys, damage, why):
    f = saved.with_name(saved.name + ".faiss")
    f.write_bytes(damage(f.read_bytes()))
    reopen_and_check(saved, capsys, why)
