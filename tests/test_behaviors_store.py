"""The behavior handbook: validation, strict parsing, SQLite store, FAISS index, hygiene, reliability."""
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from metareason.plugins.behaviors.behavior import (Behavior, BehaviorError, Provenance, check_name, clearer,
                                                   parse_citations, parse_extraction)
from metareason.plugins.behaviors.persist import read_index_file
from metareason.plugins.behaviors.store import (APPLICATION_ID, MIGRATIONS, Handbook, HandbookError)

from conftest import REPO


def B(name, instruction, topic=None, **kw):
    return Behavior(name, instruction, topic=topic, **kw)


# ------------------------------------------------------------------ names and parsing
@pytest.mark.parametrize("name", ["behavior_x", "behavior_inclusion_exclusion_principle", "behavior_base_10"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["inclusion_exclusion", "behavior_", "behavior_Camel", "behavior__double",
                                  "behavior_trailing_", "behavior_has space", "Behavior_x"])
def test_invalid_names_are_rejected(name):
    with pytest.raises(BehaviorError, match="name"):
        check_name(name)


def test_extraction_lines_parsed_strictly_and_malformed_counted():
    text = ("Here are the behaviors:\n"
            "behavior_inclusion_exclusion: Avoid double counting by subtracting intersections.\n"
            "- behavior_translate_verbal_to_equation: Formalize word problems systematically.\n"
            "\n"
            "behavior_BadName: Upper case is not snake case.\n"
            "behavior_empty:   \n"
            "behavior_long: One. Two. Three.\n"
            "inclusion: missing the prefix.\n")
    got = parse_extraction(text)
    assert [b.name for b in got.behaviors] == ["behavior_inclusion_exclusion", "behavior_translate_verbal_to_equation"]
    assert got.behaviors[0].instruction == "Avoid double counting by subtracting intersections."
    assert len(got.rejected) == 5  # preamble, bad name, empty instruction, 3 sentences, no prefix
    reasons = " | ".join(r for _, r in got.rejected)
    assert "3 sentences" in reasons and "empty" in reasons


def test_extraction_json_form():
    text = json.dumps([{"name": "behavior_a", "instruction": "Do a."}, {"name": "bad", "instruction": "x"},
                       {"name": "behavior_b", "instruction": "Do b.", "extra": 1}])
    got = parse_extraction(text)
    assert [b.name for b in got.behaviors] == ["behavior_a"]
    assert len(got.rejected) == 2


def test_citations_only_known_names_once_each():
    text = "Using behavior_rev then behavior_dbl, again behavior_rev; behavior_made_up is not one."
    assert parse_citations(text, {"behavior_rev", "behavior_dbl"}) == ["behavior_rev", "behavior_dbl"]
    assert parse_citations(text) == ["behavior_rev", "behavior_dbl", "behavior_made_up"]


def test_clearer_instruction():
    assert clearer("Do it. Then more. And more.", "Do it.") == "Do it."  # within the sentence limit wins
    assert clearer("Reverse the digits of the", "Reverse the digits.") == "Reverse the digits."  # complete wins
    assert clearer("Reverse the digits of the number one by one.", "Reverse the digits.") == "Reverse the digits."
    assert clearer("Same length.", "Also same.") == "Same length."  # a tie keeps the stored one


# ------------------------------------------------------------------ store basics
@pytest.fixture
def hb(tmp_path):
    h = Handbook(tmp_path / "hb.db", embedder="hashing")
    yield h
    h.close()


def test_insert_get_and_provenance(hb):
    rep = hb.add(B("behavior_rev", "Reverse the digits.", "digits",
                   provenance=[Provenance("ex1", "abc123", "strategist")]))
    assert (rep.inserted, rep.merged) == (1, 0)
    b = hb.get("behavior_rev")
    assert b.instruction == "Reverse the digits." and b.topic == "digits"
    assert [(p.example_id, p.trace_hash, p.generator) for p in b.provenance] == [("ex1", "abc123", "strategist")]
    assert (b.retrieved, b.cited, b.cited_correct) == (0, 0, 0)
    assert hb.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert hb.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_invalid_behavior_is_not_inserted(hb):
    with pytest.raises(BehaviorError, match="name"):
        hb.add_many([B("behavior_ok", "Fine."), B("not_a_behavior", "Bad.")])
    assert len(hb) == 0  # validated before the transaction: nothing half-written


def test_same_name_merges_provenance_counters_and_keeps_clearer(hb):
    hb.add(B("behavior_rev", "Reverse the digits of the number one at a time from the last.", "a",
             provenance=[Provenance("e1", "h1", "g")], cited=2, cited_correct=1, retrieved=5))
    rep = hb.add(B("behavior_rev", "Reverse the digits.", "b", provenance=[Provenance("e2", "h2", "g")],
                   cited=3, cited_correct=2, retrieved=1))
    assert (rep.inserted, rep.merged) == (0, 1)
    assert len(hb) == 1
    b = hb.get("behavior_rev")
    assert b.instruction == "Reverse the digits."
    assert (b.retrieved, b.cited, b.cited_correct) == (6, 5, 3)
    assert [p.example_id for p in b.provenance] == ["e1", "e2"]
    assert b.topic == "a" and b.topics == ["b"]  # serves both topics in topic retrieval
    assert [x.name for x in hb.by_topic("b", 5)] == ["behavior_rev"]


def test_near_duplicate_merges_by_embedding_similarity(tmp_path):
    with Handbook(tmp_path / "hb.db", embedder="hashing", merge_threshold=0.8) as h:
        h.add(B("behavior_reverse_digits", "Reverse the order of the digits of the number."))
        rep = h.add(B("behavior_flip_digits", "Reverse the order of the digits of the number now."))
        assert (rep.inserted, rep.merged) == (0, 1) and rep.names == ["behavior_reverse_digits"]
        rep = h.add(B("behavior_digit_sum", "Add up all the digits."))
        assert rep.inserted == 1
        assert len(h) == 2
    with Handbook(tmp_path / "hb2.db", embedder="hashing", merge_threshold=1.0) as h:
        h.add(B("behavior_reverse_digits", "Reverse the order of the digits of the number."))
        h.add(B("behavior_flip_digits", "Reverse the order of the digits of the number now."))
        assert len(h) == 2  # below the threshold: kept apart


def test_duplicates_within_one_batch_merge(hb):
    rep = hb.add_many([B("behavior_a", "Do a thing."), B("behavior_a", "Do a."), B("behavior_b", "Other work entirely.")])
    assert (rep.inserted, rep.merged) == (2, 1)
    assert hb.get("behavior_a").instruction == "Do a."


def test_topic_retrieval_orders_by_usefulness_and_caps_k(hb):
    hb.add_many([B("behavior_a", "Alpha rule.", "t"), B("behavior_b", "Beta rule.", "t"),
                 B("behavior_c", "Gamma rule.", "t"), B("behavior_d", "Delta rule.", "u")])
    hb.record_citations({"behavior_c": 4, "behavior_b": 1}, {"behavior_c": 3})
    assert [b.name for b in hb.by_topic("t", 2)] == ["behavior_b", "behavior_c"]  # top 2, insertion order
    assert [b.name for b in hb.by_topic("t", 5)] == ["behavior_a", "behavior_b", "behavior_c"]
    assert hb.by_topic("nope", 3) == []


def test_counters_recorded(hb):
    hb.add_many([B("behavior_a", "Alpha rule."), B("behavior_b", "Beta rule.")])
    hb.record_retrieved({"behavior_a": 3})
    hb.record_citations({"behavior_a": 2, "behavior_b": 1}, {"behavior_a": 1})
    a, b = hb.get("behavior_a"), hb.get("behavior_b")
    assert (a.retrieved, a.cited, a.cited_correct) == (3, 2, 1)
    assert (b.retrieved, b.cited, b.cited_correct) == (0, 1, 0)


def test_prune_min_cited_and_older_than(hb):
    old = time.time() - 10 * 86400
    hb.add_many([B("behavior_old_unused", "Alpha rule.", created=old), B("behavior_old_used", "Beta rule.", created=old),
                 B("behavior_new_unused", "Gamma rule.")])
    hb.record_citations({"behavior_old_used": 3}, {})
    assert hb.prune(min_cited=2, older_than_days=5) == ["behavior_old_unused"]
    assert sorted(hb.names()) == ["behavior_new_unused", "behavior_old_used"]
    assert [b.name for b, _ in hb.search("alpha rule", 3)] != [] and "behavior_old_unused" not in \
        [b.name for b, _ in hb.search("alpha rule", 3)]
    assert hb.prune(min_cited=1, older_than_days=0, now=time.time() + 1) == ["behavior_new_unused"]


def test_export_import_roundtrip(tmp_path, hb):
    hb.add_many([B("behavior_a", "Alpha rule.", "t", provenance=[Provenance("e1", "h", "g")]),
                 B("behavior_b", "Beta rule.", "u")])
    hb.record_citations({"behavior_a": 2}, {"behavior_a": 1})
    out = tmp_path / "x.jsonl"
    assert hb.export_jsonl(out) == 2
    with Handbook(tmp_path / "other.db", embedder="hashing") as h2:
        rep = h2.import_jsonl(out)
        assert rep.inserted == 2
        a = h2.get("behavior_a")
        assert (a.cited, a.cited_correct, a.topic) == (2, 1, "t")
        assert [p.example_id for p in a.provenance] == ["e1"]


def test_import_bad_line_names_file_and_line_and_writes_nothing(tmp_path, hb):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"name": "behavior_a", "instruction": "Alpha."}) + "\n"
                   + json.dumps({"name": "behavior_b"}) + "\n")
    with pytest.raises(HandbookError, match=r"bad.jsonl:2: instruction: missing"):
        hb.import_jsonl(bad)
    assert len(hb) == 0


# ------------------------------------------------------------------ files: corrupt, foreign, versions
def test_corrupt_file_one_line_error_never_overwritten(tmp_path):
    path = tmp_path / "hb.db"
    data = b"this is not a database at all\n" * 50
    path.write_bytes(data)
    with pytest.raises(HandbookError) as err:
        Handbook(path, embedder="hashing")
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "not a SQLite database" in msg
    assert path.read_bytes() == data
    assert not (tmp_path / "hb.db-wal").exists()


def test_damaged_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "hb.db"
    with Handbook(path, embedder="hashing") as h:
        h.add_many([B(f"behavior_n{i}", f"Rule number {i}.") for i in range(200)])
    raw = bytearray(path.read_bytes())
    raw[4096:8192] = b"\xff" * 4096  # clobber a page, keep the header
    path.write_bytes(bytes(raw))
    with pytest.raises(HandbookError, match="hb.db"):
        Handbook(path, embedder="hashing")
    assert path.read_bytes() == bytes(raw)


def test_foreign_sqlite_db_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE accounts (id INTEGER, owner TEXT)")
    db.execute("INSERT INTO accounts VALUES (1, 'x')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(HandbookError, match="another program"):
        Handbook(path, embedder="hashing")
    assert path.read_bytes() == before


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "hb.db"
    Handbook(path, embedder="hashing").close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(HandbookError, match="schema version 99 is newer"):
        Handbook(path, embedder="hashing")


def test_migration_from_schema_v1(tmp_path):
    path = tmp_path / "hb.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for stmt in MIGRATIONS[1]:
        db.execute(stmt)
    db.execute("PRAGMA user_version = 1")
    import numpy as np

    from metareason.plugins.behaviors.embedder import get_embedder

    vec = get_embedder("hashing").encode(["rev: Reverse the digits."])[0]
    db.execute("INSERT INTO meta VALUES ('embed_epoch', '0'), ('embedder', 'hashing:256'), ('dim', '256')")
    db.execute("INSERT INTO behaviors(name, instruction, topic, created, updated, retrieved, cited, embedding) "
               "VALUES ('behavior_rev', 'Reverse the digits.', 'digits', 1.0, 1.0, 2, 1, ?)", (vec.astype(np.float32).tobytes(),))
    db.commit()
    db.close()
    with Handbook(path, embedder="hashing") as h:
        assert h.db.execute("PRAGMA user_version").fetchone()[0] == 2
        b = h.get("behavior_rev")
        assert (b.retrieved, b.cited, b.cited_correct) == (2, 1, 0)
        assert [x.name for x in h.by_topic("digits", 3)] == ["behavior_rev"]  # topics migrated
        h.record_citations({"behavior_rev": 1}, {"behavior_rev": 1})
        assert h.get("behavior_rev").cited_correct == 1


# ------------------------------------------------------------------ the FAISS index beside the DB
def test_index_persisted_and_rebuilt_when_missing_or_stale(tmp_path):
    path = tmp_path / "hb.db"
    with Handbook(path, embedder="hashing") as h:
        h.add_many([B("behavior_a", "Alpha rule about apples."), B("behavior_b", "Beta rule about bananas.")])
        assert h.search("apples", 1)[0][0].name == "behavior_a"
    index = tmp_path / "hb.db.faiss"
    assert index.exists() and read_index_file(index)[0]["count"] == 2  # one file: index + the DB state
    with Handbook(path, embedder="hashing") as h:  # loaded, not rebuilt
        h.search("apples", 1)
        assert not h._index_dirty
    index.unlink()
    with Handbook(path, embedder="hashing") as h:  # missing -> rebuilt from the DB
        assert h.search("bananas", 1)[0][0].name == "behavior_b"
        assert h._index_dirty
    assert index.exists()
    # another writer (no index update) makes the persisted index stale -> rebuilt on open
    with Handbook(path, embedder="hashing") as other:
        other._index_dirty = False
        other.add(B("behavior_c", "Gamma rule about cherries."))
        other._index = None  # this writer does not save the index
    with Handbook(path, embedder="hashing") as h:
        assert h.search("cherries", 1)[0][0].name == "behavior_c"
    index.write_bytes(b"garbage")  # a damaged index is derived data: rebuilt, the DB untouched
    with Handbook(path, embedder="hashing") as h:
        assert h.search("cherries", 1)[0][0].name == "behavior_c"


def test_index_follows_another_connection_in_the_same_session(tmp_path):
    path = tmp_path / "hb.db"
    a = Handbook(path, embedder="hashing")
    b = Handbook(path, embedder="hashing")
    a.add(B("behavior_a", "Alpha rule about apples."))
    assert b.search("apples", 1)[0][0].name == "behavior_a"
    b.add(B("behavior_b", "Beta rule about bananas."))
    assert a.search("bananas", 1)[0][0].name == "behavior_b"
    a.prune(min_cited=1, older_than_days=0, now=time.time() + 1)
    assert b.search("bananas", 5) == []  # deletes bump the epoch: b rebuilds
    a.close()
    b.close()


_WRITER = """
import sys
from metareason.plugins.behaviors.behavior import Behavior, Provenance
from metareason.plugins.behaviors.store import Handbook
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Handbook(path, embedder="hashing", merge_threshold=1.01) as h:  # merge by name only: every row distinct
    for i in range(n):
        h.add(Behavior(f"behavior_{tag}_{i}", f"Instruction {tag} {i}.", provenance=[Provenance(f"{tag}{i}", None, tag)]))
"""


def test_two_processes_inserting_at_once_lose_nothing(tmp_path):
    path = tmp_path / "hb.db"
    Handbook(path, embedder="hashing").close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, "150"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("p", "q")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM behaviors").fetchone()[0] == 300
    assert db.execute("SELECT count(*) FROM provenance").fetchone()[0] == 300
    db.close()
    with Handbook(path, embedder="hashing") as h:
        assert h.search("Instruction q 149.", 1)[0][0].name == "behavior_q_149"


# ------------------------------------------------------------------ MiniLM: real retrieval quality
@pytest.fixture(scope="module")
def minilm():
    from metareason.plugins.behaviors.embedder import get_embedder

    return get_embedder("minilm")


def test_minilm_embedding_topk_finds_paraphrase(tmp_path, minilm):
    with Handbook(tmp_path / "hb.db", embedder=minilm) as h:
        h.add_many([
            B("behavior_inclusion_exclusion", "Avoid double counting by subtracting the intersections of the sets."),
            B("behavior_translate_verbal_to_equation", "Turn the word problem into equations before solving."),
            B("behavior_distance_point_line", "Use |Ax+By+C|/sqrt(A^2+B^2) for the distance from a point to a line."),
            B("behavior_check_small_cases", "Try the first few values to spot a pattern."),
        ])
        top = h.search("How far is the point from the straight line? Use the formula.", 2)
        assert top[0][0].name == "behavior_distance_point_line"
        assert h.search("Do not count elements of overlapping groups twice", 1)[0][0].name == "behavior_inclusion_exclusion"


def test_minilm_near_duplicate_merge_default_threshold(tmp_path, minilm):
    with Handbook(tmp_path / "hb.db", embedder=minilm) as h:  # default threshold 0.92
        h.add(B("behavior_inclusion_exclusion", "Avoid double counting by subtracting intersections."))
        rep = h.add(B("behavior_inclusion_exclusion_principle", "Avoid double counting by subtracting the intersections."))
        assert rep.merged == 1 and len(h) == 1
        rep = h.add(B("behavior_check_small_cases", "Try the first few values to spot a pattern."))
        assert rep.inserted == 1 and len(h) == 2
