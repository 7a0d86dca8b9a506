"""Behavioural checks of method-plugin mechanisms the other tests leave implicit (each one kills a
mutant of scripts/mutants.py): the MLA softmax scale, the layers that get an LRU, the per-token
and per-level LRU statistics of `metareason lru stats`, the sweep's hypothesis check, the CSPO
control mask under an attention mask, takeover's dropping of wrong answers, and mla_decode's
causal rows that see no key."""
import math

import pytest
import torch

from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM, MLAAttention, MLAConfig
from metareason.plugins.lru.lru import LRUOutput
from metareason.plugins.lru.stats import LRUForwardStats, LRULayerStats, per_token

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_latent_dim=16,
            q_latent_dim=24, rope_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ------------------------------------------------------------------------------------- MLA
def test_mla_attention_weights_are_softmax_of_scaled_causal_scores():
    """Weights = softmax(q·k / sqrt(d_nope + d_rope)) over keys at or before the query."""
    from metareason.plugins.lru.rope import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    c = MLAConfig(hidden_size=32, num_attention_heads=4, kv_latent_dim=16, q_latent_dim=24, rope_head_dim=8,
                  nope_head_dim=12)
    mla = MLAAttention(c).eval()
    x = torch.randn(2, 5, 32)
    _, weights, _ = mla(x, output_attentions=True)
    pos = torch.arange(5)[None]
    q = mla.queries(x)
    q_nope, q_rope = q.split([c.nope_head_dim, c.rope_head_dim], dim=-1)
    cos, sin = rope_cos_sin(pos, c.rope_head_dim, c.rope_theta, q.dtype)
    latent, _ = mla.latent(x)
    k_nope = mla.W_UK(latent).view(2, 5, 4, c.nope_head_dim).transpose(1, 2)
    k_rope = apply_rope(mla.W_KR(x)[:, None], cos, sin).expand(2, 4, 5, c.rope_head_dim)
    scores = (torch.cat([q_nope, apply_rope(q_rope, cos, sin)], -1) @ torch.cat([k_nope, k_rope], -1).transpose(-1, -2))
    scores = scores / math.sqrt(c.nope_head_dim + c.rope_head_dim)
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(weights, torch.softmax(scores, -1), atol=1e-5, rtol=1e-4)


def test_lru_layers_selects_the_layers_with_an_lru():
    torch.manual_seed(0)
    model = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(**dict(TINY, num_hidden_layers=3, lru_layers=[1]))).eval()
    assert [layer.self_attn.lru is not None for layer in model.model.layers] == [False, True, False]
    out = model(torch.randint(3, 40, (1, 6)))
    assert [s.layer_idx for s in out.lru_stats.layers] == [1]


# ------------------------------------------------------------------------ LRU statistics
def _layer(residuals, num_iterations, ponder):
    residuals = torch.tensor(residuals)
    n = torch.tensor(num_iterations)
    out = LRUOutput(halt_probs=torch.zeros(residuals.shape), ponder_cost=torch.tensor(ponder),
                    num_iterations=n, remainders=torch.zeros(n.shape), residuals=residuals)
    return LRULayerStats(0, torch.ones(*n.shape, 4), out)


def test_per_token_reads_each_tokens_first_and_last_iteration_and_masks_padding():
    a = _layer([[[4.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]], [[3, 1, 4]], [[3.2, 1.5, 4.0]])
    b = _layer([[[2.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.25, 0.125], [5.0, 5.0, 5.0, 5.0]]], [[2, 4, 4]], [[2.4, 4.0, 4.0]])
    stats = LRUForwardStats([a, b], token_mask=torch.tensor([[True, True, False]]))
    tok = per_token(stats)
    torch.testing.assert_close(tok["iterations"][0, :2], torch.tensor([2.5, 2.5]))  # mean over the layers
    torch.testing.assert_close(tok["first_residual"][0, :2], torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(tok["last_residual"][0, :2], torch.tensor([1.0, 1.5625]))  # (1+1)/2, (3+0.125)/2
    torch.testing.assert_close(tok["ponder"][0, :2], torch.tensor([2.8, 2.75]))
    for key in ("iterations", "first_residual", "last_residual", "ponder"):
        assert math.isnan(tok[key][0, 2]), key  # the padding position


@pytest.fixture(scope="module")
def stats_kernel(tmp_path_factory):
    from metareason import Kernel

    arch = dict(model_type="deepseek_mla", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, kv_latent_dim=8, q_latent_dim=12, rope_head_dim=4, lru_max_iterations=4,
                lru_layers=[0, 1], max_position_embeddings=256)
    cfg = {"plugins": ["lru"], "quiet": True, "output_dir": str(tmp_path_factory.mktemp("lru_stats")),
           "model": {"arch": arch, "tokenizer": {"type": "char"}},
           "data": {"max_length": 256, "eval": [{"task": "causal_loop", "num_samples": 6, "seed": 5,
                                                 "params": {"levels": [1, 3], "split": "test"}}]}}
    torch.manual_seed(0)
    kernel = Kernel(cfg)
    model, tok = kernel.load()
    return kernel, model.eval(), tok


def test_level_stats_are_token_means_per_level_and_convergence_is_last_over_first(stats_kernel):
    """Batched statistics == each example alone, summed over its real tokens (no padding)."""
    from metareason.data.tokenize import encode_examples
    from metareason.evaluate import build_eval_examples
    from metareason.plugins.lru.level_stats import KEYS, level_stats

    kernel, model, tok = stats_kernel
    got = level_stats(kernel, model, tok, batch_size=4)
    sums, counts = {}, {}
    with torch.no_grad():
        for _, ex in build_eval_examples(kernel):
            ids = encode_examples(tok, [ex["prompt"]], [ex["completion"]], 256).input_ids[0]
            t = per_token(model(input_ids=torch.tensor([ids]), use_cache=False).lru_stats)
            for group in (ex["_group"], "all"):
                s = sums.setdefault(group, dict.fromkeys(KEYS, 0.0))
                for k in KEYS:
                    s[k] += float(t[k].sum())
                counts[group] = counts.get(group, 0) + len(ids)
    assert sorted(got) == sorted(sums) and len(got) == 3  # two levels and "all"
    for group, row in got.items():
        assert row["tokens"] == counts[group]
        for k in KEYS:
            assert row[k] == pytest.approx(sums[group][k] / counts[group], rel=1e-4), (group, k)
        assert row["convergence_ratio"] == pytest.approx(row["last_residual"] / row["first_residual"])
        assert 1 <= row["iterations"] <= 4


def test_sweep_hypothesis_iterations_rise_with_level():
    from metareason.plugins.lru.sweep_report import _levels, hypotheses

    def g(name, rho=(), acc=None):
        return {"group": name, "spearman_per_seed": list(rho), "accuracy": acc or {}}

    rising = hypotheses([g("D", [0.3, 0.1])])
    assert [(h["claim"], h["holds"]) for h in rising] == [
        ("D's iterations rise with level (Spearman > 0 on every seed)", True)]
    assert rising[0]["evidence"] == "rho per seed +0.300, +0.100"
    assert hypotheses([g("D", [0.3, 0.0])])[0]["holds"] is False  # flat on one seed is not rising
    assert hypotheses([g("E", [0.3, -0.2])])[0]["holds"] is False
    assert hypotheses([g("D", [None, None])]) == []  # constant iterations: nothing to claim

    def st(mean, lo, hi):
        return {"mean": mean, "min": lo, "max": hi, "n": 2}

    (beats,) = hypotheses([g("A", acc={"level_2": st(0.5, 0.4, 0.6)}), g("D", acc={"level_2": st(0.55, 0.5, 0.6)})])
    assert beats["claim"] == "D beats A on level_2" and beats["holds"] and "seed ranges overlap" in beats["evidence"]
    (apart,) = hypotheses([g("A", acc={"all": st(0.5, 0.4, 0.6)}), g("E", acc={"all": st(0.8, 0.7, 0.9)})])
    assert apart["holds"] and apart["evidence"].endswith("seed ranges do not overlap (E above)")
    (below,) = hypotheses([g("A", acc={"all": st(0.87, 0.86, 0.88)}), g("D", acc={"all": st(0.78, 0.77, 0.79)})])
    assert not below["holds"] and below["evidence"].endswith("seed ranges do not overlap (D below)")
    against_b = hypotheses([g("B", acc={"all": st(0.5, 0.4, 0.6)}), g("C", acc={"all": st(0.7, 0.65, 0.75)})])
    assert [(h["claim"], h["holds"]) for h in against_b] == [("C beats B on all", True)]
    assert _levels(["level_10", "level_2", "all", "level_1"]) == ["level_1", "level_2", "level_10"]  # numeric order


# --------------------------------------------------------------------------------- CSPO
def test_control_mask_leaves_out_positions_the_attention_mask_excludes():
    from metareason.models import build_char_tokenizer
    from metareason.models.special_tokens import add_special_tokens
    from metareason.plugins.cspo import CONTROL_CLOSE, CONTROL_OPEN, control_mask

    tok = build_char_tokenizer()
    add_special_tokens(tok, None, [CONTROL_OPEN, CONTROL_CLOSE])
    ids = torch.tensor([tok("a<control>ok</control>b", add_special_tokens=False)["input_ids"]])
    full = control_mask(ids, tok)
    assert full[0].int().tolist() == [0, 1, 1, 1, 1, 0]
    attention = torch.ones_like(ids)
    attention[0, 2] = 0
    assert control_mask(ids, tok, attention)[0].int().tolist() == [0, 1, 0, 1, 1, 0]


def test_takeover_drops_wrong_answers_unless_keep_incorrect(tmp_path):
    from metareason.config import ConfigError
    from metareason.plugins.cspo.takeover import run_takeover
    from tests.test_cspo_takeover import TARGET_CHAIN, save_bigram, takeover_config

    target = save_bigram(tmp_path / "target", TARGET_CHAIN)  # never writes a correct answer
    with pytest.raises(ConfigError, match="takeover kept no example"):
        run_takeover(str(takeover_config(tmp_path, target, keep_incorrect=False)), quiet=True)
    assert run_takeover(str(takeover_config(tmp_path, target, keep_incorrect=True)), quiet=True)["records"] == 3


# --------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mla_decode_causal_query_that_sees_no_key(backend):
    """s_q > seqlen with causal: the first query sees no key, so out = 0 and lse = -inf (no NaN)."""
    from metareason import ops
    from metareason.ops import mla_decode

    if backend == "cpu" and ops.extension() is None:
        pytest.skip("metareason._C is not built")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 2, 24, generator=g)
    cache = torch.randn(2, 64, 1, 24, generator=g)
    table = torch.tensor([[1]], dtype=torch.int32)
    out, lse = mla_decode(q, cache, table, torch.tensor([2], dtype=torch.int32), 16, None, True, backend=backend)
    assert torch.equal(out[0, 0], torch.zeros(2, 16)) and torch.isneginf(lse[0, :, 0]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, :, 1:]).all()
    # query 1 sees key 0 only: its output is that key's value channels
    torch.testing.assert_close(out[0, 1], cache[1, 0, 0, :16].expand(2, 16))
