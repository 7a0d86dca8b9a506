"""bench kernels: the roofline columns (copy bandwidth, sgemm) written atomically with the ratios
the docs quote; the benchmark modules of core import no plugin and read no repository file."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from metareason.benchmarks import kernels


def _args(tmp_path, **kw):
    ns = argparse.Namespace(device="cpu", quick=True, out=str(tmp_path), no_compile=True, repeats=1, threads=1,
                            ops=None)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_bench_kernels_records_the_roofline_and_ratios(tmp_path):
    assert kernels.run(_args(tmp_path)) == 0
    r = json.loads((tmp_path / "kernels-cpu-quick.json").read_text())
    m = r["machine"]
    assert m["copy_gbps"] > 0 and m["sgemm_gflops"] > 0
    mla = [row for row in r["rows"] if row["op"] == "mla_decode"]
    assert {row["dtype"] for row in mla} == {"float32", "bfloat16"}
    for row in mla:
        assert abs(row["frac_copy_bw"] - row["gbps"] / m["copy_gbps"]) < 1e-9
        assert abs(row["frac_sgemm"] - row["tflops"] * 1e3 / m["sgemm_gflops"]) < 1e-9
    for row in mla:  # the fair baselines, timed interleaved with the op: median ratio within its range
        for key in ("vs_eager", "vs_sdpa_latent", "vs_absorbed_bmm"):
            lo, hi = row[key + "_range"]
            assert 0 < lo <= row[key] <= hi
    lru = [row for row in r["rows"] if row["op"] == "lru_act"]
    assert lru and all(row["eager_compact_ms"] > 0 and row["vs_eager_compact"] > 0 for row in lru)
    assert r["command"].startswith("metareason bench kernels") and "loadavg_1m_before" in r
    assert not list(tmp_path.glob("*.tmp"))


def test_core_benchmarks_import_no_plugin():
    """core never imports a plugin (a method or model family lives in its plugin), so the kernel's
    benchmarks run from a wheel without any plugin installed."""
    core = Path(kernels.__file__).resolve().parents[1]
    offenders = [str(p.relative_to(core)) for p in core.rglob("*.py")
                 if "plugins" not in p.relative_to(core).parts
                 and re.search(r"^\s*(from|import)\s+metareason\.plugins\b", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []


def test_bench_kernels_linear_ce_rows(tmp_path):
    """--ops linear_ce: the fused op against the unfused reference, same losses, ratio within its range."""
    assert kernels.run(_args(tmp_path, ops="linear_ce", repeats=2)) == 0
    rows = json.loads((tmp_path / "kernels-cpu-quick.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["linear_ce"]
    r = rows[0]
    assert r["backend"] == "cpu" and r["rounds"] == 2
    lo, hi = r["vs_reference_range"]
    assert 0 < lo <= r["vs_reference"] <= hi
    assert r["max_abs_error_vs_reference"]["loss"] < 1e-4 and r["max_abs_error_vs_reference"]["grad_weight"] < 1e-4
    assert kernels.run(_args(tmp_path, ops="linear_ce,nope")) == 2
