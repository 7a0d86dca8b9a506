"""The statistics of the issue 28 experiment (plugins/behaviors/method_stats.py)."""
import json

import pytest

from metareason.plugins.behaviors import method_stats as ms


def sample(i, group, score, tokens):
    return {"id": f"behavior_chain/flip/{i}", "group": group, "score": score, "gen_tokens": tokens}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mcnemar_exact_counts_only_discordant_pairs():
    a = [{"score": s} for s in (1, 1, 1, 1, 1, 1, 0, 1, 0)]
    b = [{"score": s} for s in (0, 0, 0, 0, 0, 0, 0, 1, 1)]
    got = ms.mcnemar(zip(a, b))
    assert (got["only_a"], got["only_b"]) == (6, 1)
    assert got["p_value"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # binomial(7, 1/2), k <= 1, two-sided
    assert ms.mcnemar(zip(a, a))["p_value"] == 1.0
    assert ms.mcnemar([({"score": 0.5}, {"score": 1.0})])["only_b"] == 1  # partial credit is not correct


def test_samples_pair_by_condition_and_id_never_by_position(tmp_path):
    a = ms.read_samples(write(tmp_path / "a.jsonl", [
        sample(1, "behavior_chain/flip", 1.0, 200), sample(2, "behavior_chain/flip", 0.0, 210),
        sample(1, "behavior_chain/ordered/flip", 1.0, 100), sample(2, "behavior_chain/ordered/flip", 1.0, 90)]))
    assert set(a) == {("none", "behavior_chain/flip/1"), ("none", "behavior_chain/flip/2"),
                      ("ordered", "behavior_chain/flip/1"), ("ordered", "behavior_chain/flip/2")}
    pairs = ms.pair(a, a, "ordered", "none")
    assert [(x["gen_tokens"], y["gen_tokens"]) for x, y in pairs] == [(100, 200), (90, 210)]
    b = ms.read_samples(write(tmp_path / "b.jsonl", [  # the same questions in another order
        sample(2, "behavior_chain/ordered/flip", 0.0, 95), sample(1, "behavior_chain/ordered/flip", 1.0, 99),
        sample(2, "behavior_chain/flip", 0.0, 205), sample(1, "behavior_chain/flip", 1.0, 201)]))
    assert [(x["gen_tokens"], y["gen_tokens"]) for x, y in ms.pair(a, b)] == [(200, 201), (210, 205), (100, 99), (90, 95)]
    with pytest.raises(ValueError, match="different questions"):
        ms.pair(a, {k: v for k, v in b.items() if k[1] != "behavior_chain/flip/2"})
    with pytest.raises(ValueError, match="twice"):
        ms.read_samples(write(tmp_path / "c.jsonl", [sample(1, "flip", 1, 1), sample(1, "flip", 1, 1)]))


def test_wilcoxon_and_seed_interval_and_holm():
    pairs = [({"gen_tokens": 200 + i}, {"gen_tokens": 100 + 2 * i}) for i in range(20)]
    w = ms.wilcoxon_tokens(pairs)
    assert w["mean_a"] > w["mean_b"] and w["p_value"] < 1e-3
    assert ms.wilcoxon_tokens([({"gen_tokens": 5}, {"gen_tokens": 5})])["p_value"] == 1.0
    ci = ms.seed_interval([0.5, 0.6, 0.7])
    assert ci["mean"] == pytest.approx(0.6) and ci["sd"] == pytest.approx(0.1)
    assert ci["high"] - ci["mean"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    with pytest.raises(ValueError):
        ms.seed_interval([0.5])
    assert ms.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_wilcoxon_matches_the_textbook_normal_approximation_with_ties():
    # differences 1, -2, 3, 3, -5, 6, 0: the zero dropped; |3| tied at ranks 3 and 4 (3.5 each)
    pairs = [({"gen_tokens": a}, {"gen_tokens": 0}) for a in (1, -2, 3, 3, -5, 6, 0)]
    w = ms.wilcoxon_tokens(pairs)
    n, w_plus = 6, 1 + 3.5 + 3.5 + 6
    var = n * (n + 1) * (2 * n + 1) / 24 - (2 ** 3 - 2) / 48
    assert w["n"] == 6 and w["z"] == pytest.approx((w_plus - n * (n + 1) / 4) / var ** 0.5)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.wilcoxon([a for a in (1, -2, 3, 3, -5, 6, 0)], method="approx", correction=False,
                               zero_method="wilcox")
    assert w["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
