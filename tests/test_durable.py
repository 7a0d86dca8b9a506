"""metareason.durable: atomic files and directories (fsynced, nothing half-written left on a
failure) and the JSONL appender (every line whole)."""
import json
import os

import pytest

from metareason import durable


def _names(d):
    return sorted(p.name for p in d.iterdir())


class Boom(Exception):
    pass


def test_write_helpers_replace_the_file_whole(tmp_path):
    p = tmp_path / "a.json"
    durable.write_json_atomic(p, {"x": "é", "n": 1})
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": "é", "n": 1} and p.read_text().endswith("\n")
    durable.write_text_atomic(p, "text")
    assert p.read_text() == "text"
    durable.write_bytes_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    durable.write_jsonl_atomic(tmp_path / "r.jsonl", ({"i": i} for i in range(3)))
    assert [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [{"i": i} for i in range(3)]
    assert _names(tmp_path) == ["a.json", "r.jsonl"]  # no temporaries left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    durable.write_text_atomic(p, "old")

    def bad_rows():
        yield {"i": 0}
        raise Boom()

    with pytest.raises(Boom):
        durable.write_jsonl_atomic(p, bad_rows())
    with pytest.raises(TypeError):
        durable.write_json_atomic(p, {"x": object()})
    with pytest.raises(Boom):
        with durable.atomic_file(p) as tmp:
            tmp.write_text("half")
            raise Boom()
    # a crash between writing and renaming: fsync fails
    monkeypatch.setattr(durable, "fsync_file", lambda path: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        durable.write_text_atomic(p, "new")
    assert p.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_file, real_dir, real_replace = durable.fsync_file, durable.fsync_dir, os.replace
    monkeypatch.setattr(durable, "fsync_file", lambda p: (events.append(("file", p)), real_file(p)))
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (events.append(("dir", p)), real_dir(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a)), real_replace(a, b)))
    durable.write_text_atomic(tmp_path / "a", "x")
    assert [e[0] for e in events] == ["file", "replace", "dir"]
    assert events[0][1] == events[1][1] and events[2][1] == tmp_path


def test_atomic_dir_publishes_a_complete_directory(tmp_path, monkeypatch):
    target = tmp_path / "out"
    synced = []
    real_tree = durable.fsync_tree
    monkeypatch.setattr(durable, "fsync_tree", lambda p: (synced.append(sorted(os.listdir(p))), real_tree(p)))
    with durable.atomic_dir(target) as d:
        (d / "a").write_text("1")
        (d / "sub").mkdir()
        (d / "sub" / "b").write_text("2")
        assert not target.exists()
    assert synced == [["a", "sub"]]  # fsynced with everything in it, before it was published
    assert (target / "sub" / "b").read_text() == "2" and _names(tmp_path) == ["out"]


def test_atomic_dir_failure_removes_the_temporary_and_keeps_the_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(Boom):
        with durable.atomic_dir(target, replace=True) as d:
            (d / "new").write_text("half")
            raise Boom()
    assert _names(target) == ["old"] and _names(tmp_path) == ["out"]
    with pytest.raises(OSError):  # a non-empty target without replace: refused, nothing left over
        with durable.atomic_dir(target) as d:
            (d / "new").write_text("x")
    assert _names(target) == ["old"] and _names(tmp_path) == ["out"]
    with durable.atomic_dir(target, replace=True) as d:
        (d / "new").write_text("x")
    assert _names(target) == ["new"] and _names(tmp_path) == ["out"]


def test_atomic_dir_replaces_an_empty_directory_and_takes_a_prefix(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with durable.atomic_dir(target, prefix=".tmp-step-") as d:
        assert d.name.startswith(".tmp-step-")
        (d / "f").write_text("x")
    assert _names(target) == ["f"]


def test_append_jsonl_lines_stay_whole(tmp_path, monkeypatch):
    p = tmp_path / "m.jsonl"
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    for i in range(3):
        durable.append_jsonl(p, {"step": i, "text": "é\n"})
    assert len(synced) == 3  # one fsync per line
    assert [json.loads(x)["step"] for x in p.read_text(encoding="utf-8").splitlines()] == [0, 1, 2]
    # a crash tore the last line: the next append cuts it off instead of gluing onto it
    with open(p, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "te')
    durable.append_jsonl(p, {"step": 4})
    assert [json.loads(x)["step"] for x in p.read_text(encoding="utf-8").splitlines()] == [0, 1, 2, 4]
    q = tmp_path / "torn-only.jsonl"
    q.write_text('{"a"')
    durable.append_jsonl(q, {"b": 1})
    assert q.read_text() == '{"b": 1}\n'
