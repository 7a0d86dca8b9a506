"""`metareason bench serve`: the repeats' summary (medians, ranges, ratios paired by repeat) and
one small run end to end against a real `metareason serve` and the static engine."""
import json

import pytest

from metareason.benchmarks import serve as bs
from tests.conftest import run_cli, save_tiny_llama

A, B = "continuous (metareason serve)", "static (earlier engine, in-process)"


def _row(side, c, rep, rps):
    return {"side": side, "concurrency": c, "repeat": rep, "requests_per_s": rps,
            **{k: 10.0 * (rep + 1) for k in bs.SUMMARY_KEYS if k != "requests_per_s"}}


def test_summary_is_medians_and_ranges_and_ratios_are_paired_by_repeat():
    rows = [_row(A, 8, r, v) for r, v in enumerate([1.0, 4.0, 9.0])] + \
           [_row(B, 8, r, v) for r, v in enumerate([1.0, 1.0, 9.0])]
    s = bs.summarise(rows, [A, B])
    a = next(r for r in s["rows"] if r["side"] == A)
    assert a["requests_per_s"] == 4.0 and a["requests_per_s_range"] == [1.0, 9.0] and a["repeats"] == 3
    assert a["ttft_p99_ms"] == 20.0 and a["ttft_p99_ms_range"] == [10.0, 30.0]
    (ratio,) = s["ratios"]
    # paired by repeat: 1/1, 4/1, 9/9 -> median 1.0 (the ratio of the medians would say 4.0)
    assert ratio["per_repeat"] == [1.0, 4.0, 1.0] and ratio["median"] == 1.0
    assert (ratio["min"], ratio["max"], ratio["vs"], ratio["concurrency"]) == (1.0, 4.0, B, 8)
    even = bs.summarise([_row(A, 1, r, v) for r, v in enumerate([1.0, 3.0])], [A])
    assert even["rows"][0]["requests_per_s"] == 2.0 and even["ratios"] == []


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory):
    """The suite's tiny Llama with a context that holds the bench's prompts (up to ~400 chars)
    plus their 128 new tokens."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_long"), max_position_embeddings=1024)


@pytest.mark.slow
def test_bench_serve_repeats_end_to_end(long_tiny_dir, tmp_path):
    out = tmp_path / "serve.json"
    r = run_cli("bench", "serve", "--model", str(long_tiny_dir), "--requests", "3,4", "--concurrency", "1,2",
                "--sides", "continuous,static", "--repeats", "2", "--max-batch-size", "4", "--timeout", "120",
                "--out", str(out), env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["failed_sides"] == {} and rec["repeats"] == 2
    assert sorted((x["side"][:6], x["concurrency"], x["repeat"]) for x in rec["rows"]) == sorted(
        (s, c, k) for s in ("contin", "static") for c in (1, 2) for k in (0, 1))
    assert all(x["requests"] == {1: 3, 2: 4}[x["concurrency"]] and x["requests_per_s"] > 0 for x in rec["rows"])
    assert rec["requests"] == {"1": 3, "2": 4}
    assert [(x["side"][:6], x["concurrency"]) for x in rec["summary"]] == [("contin", 1), ("contin", 2),
                                                                           ("static", 1), ("static", 2)]
    assert [len(x["per_repeat"]) for x in rec["ratios"]] == [2, 2]
    md = out.with_suffix(".md").read_text()
    assert "paired by repeat" in md and "measured 2 times" in md and "(3 at 1 in flight, 4 at 2 in flight)" in md
    bad = run_cli("bench", "serve", "--model", str(long_tiny_dir), "--repeats", "0", "--out", str(tmp_path / "x.json"))
    assert bad.returncode != 0 and "--repeats" in bad.stderr and not (tmp_path / "x.json").exists()


def test_requests_per_level():
    from metareason.errors import UserError

    assert bs.per_level_requests("64", [1, 8]) == {1: 64, 8: 64}
    assert bs.per_level_requests("16,64", [1, 8]) == {1: 16, 8: 64}
    for bad, why in (("16,32,64", "3 counts for 2"), ("x", "not a number"), ("0,4", "at least 1")):
        with pytest.raises(UserError, match=why):
            bs.per_level_requests(bad, [1, 8])


def test_transformers_cli_is_found_beside_the_interpreter_first(tmp_path, monkeypatch):
    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    (venv_bin / "transformers").write_text("#!/bin/sh\n")
    monkeypatch.setattr(bs.sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert bs._transformers_cli() == str(venv_bin / "transformers")  # a venv used without activating it
    (venv_bin / "transformers").unlink()
    with pytest.raises(FileNotFoundError, match="transformers"):
        bs._transformers_cli()
