"""bench kernels: the roofline columns (copy bandwidth, sgemm) and the decode comparison write
what they measured, atomically, with the ratios the docs quote."""
from __future__ import annotations

import argparse
import json

from metareason.benchmarks import kernels


def _args(tmp_path, **kw):
    ns = argparse.Namespace(device="cpu", quick=True, out=str(tmp_path), no_compile=True, repeats=1, threads=1,
                            decode=False)
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
    assert r["command"].startswith("metareason bench kernels") and "loadavg_1m_before" in r
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_decode_compares_the_three_caches(tmp_path):
    assert kernels.run(_args(tmp_path, decode=True)) == 0
    r = json.loads((tmp_path / "kernels-decode-cpu-quick.json").read_text())["runs"][0]
    models = r["models"]
    assert set(models) == {"A_llama", "B_mla_dynamic", "B_mla_paged_kernel"}
    assert models["B_mla_paged_kernel"]["cache_type"] == "PagedLatentCache"
    # 4 layers x fp32: Llama caches K and V (2 x 128), MLA the latent + rope key (64 + 16)
    assert models["A_llama"]["cache_bytes_per_token"] == 4 * 4 * 2 * 128
    assert models["B_mla_dynamic"]["cache_bytes_per_token"] == 4 * 4 * (64 + 16)
    # the paged cache allocates whole 64-row blocks: at least the latent bytes, at most one block more per row
    paged = models["B_mla_paged_kernel"]
    tokens = r["batch"] * (r["prompt"] + r["new_tokens"])
    assert 4 * 4 * 80 <= paged["cache_bytes_per_token"] <= 4 * 4 * 80 * (tokens + r["batch"] * 64) / tokens
    assert all(m["decode_tokens_per_s"] > 0 for m in models.values())
