"""The retrieval benchmark (issue 28): a hit is the target itself, merges are reported apart, the
query's parts are timed apart, and batched throughput goes through ``search_many``."""
import json

from metareason.plugins.behaviors.retrieval_bench import run_retrieval_bench, score_hits


def test_a_hit_is_the_target_itself_and_merges_are_reported_apart():
    found = [
        ["behavior_a", "behavior_x", "behavior_y"],  # target at rank 1
        ["behavior_x", "behavior_b", "behavior_y"],  # target at rank 2
        ["behavior_m", "behavior_x", "behavior_y"],  # target c merged into m, m found at rank 1: a miss
        ["behavior_x", "behavior_y", "behavior_z"],  # target d merged into n, n not found: a miss
        ["behavior_x", "behavior_y", "behavior_z"],  # target e not found
    ]
    targets = ["behavior_a", "behavior_b", "behavior_c", "behavior_d", "behavior_e"]
    stored_as = ["behavior_a", "behavior_b", "behavior_m", "behavior_n", "behavior_e"]
    got = score_hits(found, targets, stored_as, ks=(1, 2, 3))
    assert got["recall"] == {"@1": 1 / 5, "@2": 2 / 5, "@3": 2 / 5}
    assert got["merged_targets"] == 2
    assert got["found_merged_into"] == {"@1": 1, "@2": 1, "@3": 1}
    # a target that merged into another behavior is a miss even with that behavior at the top
    assert score_hits([["behavior_m"]], ["behavior_c"], ["behavior_m"], ks=(1,))["recall"]["@1"] == 0.0


def test_bench_times_each_part_and_the_batched_search(tmp_path):
    rec = run_retrieval_bench(n=200, queries=20, out=str(tmp_path / "r.json"), embedder="hashing", quiet=True)
    for key in ("embed_ms_p50", "faiss_search_ms_p50", "sql_rows_ms_p50", "query_ms_p50", "batched_s"):
        assert rec[key] >= 0.0, key
    assert rec["batched_queries_per_s"] > 0 and rec["batched_rank_mismatches"] == 0
    assert 0 <= rec["merged_targets"] <= min(rec["queries"], rec["generated"] - rec["stored"])
    assert set(rec["found_merged_into"]) == set(rec["recall"]) == {"@1", "@5", "@10"}
    md = (tmp_path / "r.md").read_text()
    assert "a hit is the target itself" in md and "SQL row look-up alone" in md and "search_many" in md
    assert json.loads((tmp_path / "r.json").read_text())["queries"] == 20
