"""Group E (``lru_cross_read``, plugins/lru/chain.py): the LRU whose iterations read earlier positions.

The mechanism: a constructed k-hop chain is solved with k iterations and not with k−1, while the
plain LRU never moves the value; gradient flows from a later token to an earlier one through the
LRU alone; the read is causal, ignores padding, is frozen for halted tokens, addresses relative
positions; with a zero read it is exactly the plain LRU's ACT recurrence. The model: cached
decoding (paged and dynamic caches, beam search) equals full recomputation, the loss terms and
statistics work unchanged, config errors name the field.
"""
import math

import pytest
import torch

from metareason.models.compat import CACHE_KWARG
from metareason.ops.lru_act import lru_act_reference
from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM, LatentReasoningUnit, LRUConfig
from metareason.plugins.lru.chain import ChainReasoningUnit, ChainStates
from metareason.plugins.lru.stats import per_token

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_latent_dim=16,
            q_latent_dim=24, rope_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, lru_cross_read=True)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return DeepSeekMLAForCausalLM(DeepSeekMLAConfig(**dict(TINY, **kw))).eval()


def random_unit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(latent_dim=16, max_iterations=6, cross_read=True, read_dim=8, read_rope_dim=4, init_gain=2.0)
    cfg.update(kw)
    return ChainReasoningUnit(LRUConfig(**cfg))


# --------------------------------------------------------------------------- the constructed chain
L = 10  # positions
ADDR, PTR, VAL, FLAG = 0, L, 2 * L, 2 * L + 1  # latent layout: [own address | pointer | value | halt flag]
D = 2 * L + 2


def chain_unit(max_iterations, fixed=True, cross_read=True):
    """Hand-set weights: each iteration, every token reads the token its pointer names (hard
    attention: query = pointer, key = own address) and copies that token's value slot; nothing else
    changes. A token with the halt flag set halts after its first iteration (ACT mode)."""
    cfg = LRUConfig(latent_dim=D, max_iterations=max_iterations, fixed_iterations=fixed, halt_threshold=0.99,
                    cross_read=cross_read, read_dim=L, read_rope_dim=0)
    unit = ChainReasoningUnit(cfg) if cross_read else LatentReasoningUnit(cfg)
    with torch.no_grad():
        for p in unit.parameters():
            p.zero_()
        unit.b[:D].fill_(-20.0)  # z ≈ 0: every slot keeps its content ...
        unit.b[VAL] = 20.0  # ... except the value slot, which takes the candidate
        unit.w_p[FLAG] = 40.0
        unit.b_p.fill_(-20.0)  # p ≈ 1 with the flag, ≈ 2e-9 without
        if cross_read:
            unit.W_rq[:, PTR:PTR + L] = 30.0 * math.sqrt(L) * torch.eye(L)  # score 30 on the pointed token
            unit.W_rk[:, ADDR:ADDR + L] = torch.eye(L)
            unit.V_h[VAL, VAL] = 20.0  # candidate value = tanh(20 · read value) = ±1, or 0 when unknown
    return unit.requires_grad_(False)


def chain_latents(k, source_value, halted=(), start=1):
    """A k-hop chain s_0 < s_1 < ... < s_k (every other position, from ``start``) among distractors
    that hold random ±1 values and point to themselves. s_0 holds ``source_value``; s_1..s_k point to
    their predecessor and hold 0 (unknown). Returns the latent ``[1, L, D]`` and s_k."""
    g = torch.Generator().manual_seed(k)
    x = torch.zeros(1, L, D)
    chain = [start + 2 * i for i in range(k + 1)]
    for pos in range(L):
        x[0, pos, ADDR + pos] = 1.0
        x[0, pos, PTR + pos] = 1.0
        x[0, pos, VAL] = float(torch.randint(0, 2, (1,), generator=g)) * 2 - 1
    x[0, chain[0], VAL] = source_value
    for prev, node in zip(chain, chain[1:]):
        x[0, node, PTR + node] = 0.0
        x[0, node, PTR + prev] = 1.0
        x[0, node, VAL] = 0.0
    for node in halted:
        x[0, chain[node], FLAG] = 1.0
    return x, chain[-1]


def end_value(unit, x, end):
    return float(unit(x)[0][0, end, VAL])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_k_hop_chain_needs_exactly_k_iterations(k):
    for v in (1.0, -1.0):
        x, end = chain_latents(k, v)
        assert end_value(chain_unit(k), x, end) == pytest.approx(v, abs=1e-3)  # k iterations: arrived
        assert end_value(chain_unit(k + 2), x, end) == pytest.approx(v, abs=1e-3)  # ... and it stays
        if k > 1:
            assert abs(end_value(chain_unit(k - 1), x, end)) < 1e-3  # k-1: still unknown (0)
    # every other token keeps its value (distractors, the source)
    x, end = chain_latents(k, 1.0)
    out = chain_unit(k)(x)[0]
    others = [p for p in range(L) if x[0, p, VAL] != 0]
    torch.testing.assert_close(out[0, others, VAL], x[0, others, VAL], atol=1e-3, rtol=0)


def test_plain_lru_cannot_move_the_value_at_any_iteration_count():
    """The same construction without the read: the end token's output never depends on the source."""
    for n in range(1, 9):
        unit = chain_unit(n, cross_read=False)
        x_pos, end = chain_latents(1, 1.0)
        x_neg, _ = chain_latents(1, -1.0)
        out_pos, out_neg = unit(x_pos)[0][0, end], unit(x_neg)[0][0, end]
        assert torch.equal(out_pos, out_neg)
        assert abs(float(out_pos[VAL])) < 1e-3


def test_act_halted_token_is_frozen_and_later_readers_see_it():
    """s_2 halts after its first iteration, before the value reached it: its frozen (unknown) state
    is what s_3 reads at every later iteration, so the value never arrives; without the halt it does."""
    for v in (1.0, -1.0):
        x, end = chain_latents(3, v)
        out, stats = chain_unit(6, fixed=False)(x)
        assert float(out[0, end, VAL]) == pytest.approx(v, abs=1e-3)
        assert int(stats.num_iterations[0, end]) == 6
        x, end = chain_latents(3, v, halted=[2])
        out, stats = chain_unit(6, fixed=False)(x)
        assert int(stats.num_iterations[0, 5]) == 1  # s_2 (position 5) halted at once
        assert abs(float(out[0, end, VAL])) < 1e-3
        assert abs(float(out[0, 5, VAL])) < 1e-3


# --------------------------------------------------------------------------- random-weight properties
@pytest.mark.parametrize("fixed", [False, True])
def test_read_is_causal(fixed):
    unit = random_unit(fixed_iterations=fixed)
    x = torch.randn(2, 9, 16)
    y = x.clone()
    y[:, 6] += torch.randn(2, 16)
    (a, sa), (b, sb) = unit(x), unit(y)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)  # the past never sees the future
    torch.testing.assert_close(sa.halt_probs[:, :6], sb.halt_probs[:, :6], atol=1e-6, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # ... while later tokens read it


@pytest.mark.parametrize("fixed", [False, True])
def test_gradient_reaches_earlier_tokens_through_the_lru(fixed):
    x = torch.randn(2, 7, 16, requires_grad=True)
    out, _ = random_unit(fixed_iterations=fixed)(x)
    out[:, -1].square().sum().backward()
    assert x.grad[:, 0].abs().sum() > 1e-4  # the last token's loss reaches the first token's input
    assert x.grad[:, :-1].abs().sum(-1).min() > 0
    plain = LatentReasoningUnit(LRUConfig(latent_dim=16, max_iterations=6, fixed_iterations=fixed))
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2)[0][:, -1].square().sum().backward()
    assert x2.grad[:, :-1].abs().max() == 0  # the plain LRU: no path between positions


@pytest.mark.parametrize("fixed", [False, True])
def test_zero_read_is_the_plain_lru_act(fixed):
    """With V = V_h = 0 the read changes nothing: the same ACT recurrence as metareason.ops.lru_act."""
    unit = random_unit(fixed_iterations=fixed, halt_bias_init=-1.0, init_gain=1.0)
    with torch.no_grad():
        unit.V.zero_()
        unit.V_h.zero_()
    x = torch.randn(3, 5, 16)
    out, stats = unit(x)
    ref = lru_act_reference(x, unit.params(), 6, 0.99, fixed_iterations=fixed)
    torch.testing.assert_close(out, ref.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.halt_probs, ref.halt_probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(stats.num_iterations, ref.num_iterations)
    torch.testing.assert_close(stats.remainders, ref.remainders, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.residuals, ref.residuals, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.ponder_cost, ref.num_iterations.float() + ref.remainders)
    if not fixed:
        assert bool((stats.num_iterations < 6).any())  # halting was exercised


def test_read_addresses_relative_positions():
    unit = random_unit(fixed_iterations=True)
    x = torch.randn(1, 6, 16)
    pos = torch.arange(6)[None]
    out = unit(x, position_ids=pos)[0]
    torch.testing.assert_close(unit(x, position_ids=pos + 11)[0], out, atol=1e-5, rtol=1e-4)  # shift: same
    assert (unit(x, position_ids=pos * 3)[0] - out).abs().max() > 1e-3  # spread: positions matter


# ------------------------------------------------------------------------------------------ the model
def test_left_padded_row_equals_the_same_row_unpadded():
    model = tiny_model()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        left = model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     use_cache=False).logits
    torch.testing.assert_close(left[:, 3:], plain, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
@pytest.mark.parametrize("fixed", [False, True])
def test_cached_generation_equals_full_recomputation(decode_cache, fixed):
    model = tiny_model(decode_cache=decode_cache, lru_fixed_iterations=fixed)
    ids = torch.randint(3, 40, (3, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding, as in evaluation
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    cache = getattr(out, CACHE_KWARG)
    assert type(cache).__name__ == ("PagedLatentCache" if decode_cache == "paged" else "ChainDynamicCache")
    states = cache.lru_chain_states
    assert isinstance(states, ChainStates) and states.length(0) == 6 + 7  # every iteration of every position
    assert states.get(1)[0].shape[:3] == (model.config.lru_max_iterations, 3, 13)
    for t, step_logits in enumerate(out.logits):
        seq = out.sequences[:, :6 + t]
        m = torch.cat([mask, torch.ones(3, t, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            full = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
def test_beam_search_with_cache_equals_without(decode_cache):
    model = tiny_model(decode_cache=decode_cache)
    ids = torch.randint(3, 40, (2, 5))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=3, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(use_cache=True, **kw), model.generate(use_cache=False, **kw))


@pytest.mark.parametrize("decode_cache", ["paged", "dynamic"])
def test_cache_reorder_and_selection_move_the_iteration_states(decode_cache):
    model = tiny_model(decode_cache=decode_cache)
    ids = torch.randint(3, 40, (3, 5))
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, use_cache=True), CACHE_KWARG)
    before = cache.lru_chain_states.get(0)[0].clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    torch.testing.assert_close(cache.lru_chain_states.get(0)[0], before[:, [2, 0, 0]])
    if decode_cache == "dynamic":
        cache.batch_select_indices(torch.tensor([1]))
        torch.testing.assert_close(cache.lru_chain_states.get(0)[0], before[:, [0]])


def test_loss_terms_and_statistics_work_unchanged():
    model = tiny_model()
    model.train()
    ids = torch.randint(3, 40, (2, 7))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"stability", "sparsity", "ponder"}
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    out.loss.backward()
    lru = model.model.layers[0].self_attn.lru
    for name in ("W_rq", "W_rk", "V", "V_h", "w_p", "b_p"):
        assert getattr(lru, name).grad.abs().sum() > 0, name
    tok = per_token(out.lru_stats)
    assert tok["iterations"].shape == (2, 7) and bool((tok["iterations"] >= 1).all())


def test_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.lru_cross_read and isinstance(loaded.model.layers[0].self_attn.lru, ChainReasoningUnit)
    ids = torch.randint(3, 40, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bad_fields_name_the_field():
    with pytest.raises(ValueError, match="lru_cross_read: needs use_lru: true"):
        DeepSeekMLAConfig(**dict(TINY, use_lru=False))
    with pytest.raises(ValueError, match="lru_read_rope_dim: expected an even int"):
        DeepSeekMLAConfig(**dict(TINY, lru_read_rope_dim=3))
    with pytest.raises(ValueError, match="lru_read_dim: expected an int >= 1"):
        DeepSeekMLAConfig(**dict(TINY, lru_read_dim=0))
    with pytest.raises(ValueError, match="read_rope_dim: expected an even int in \\[0, read_dim = 4\\]"):
        LRUConfig(latent_dim=8, cross_read=True, read_dim=4, read_rope_dim=6)
    unit = random_unit()
    with pytest.raises(ValueError, match="a tuple past_key_values cannot hold"):
        unit(torch.randn(1, 2, 16), cache=(torch.zeros(1, 1, 16), torch.zeros(1, 1, 8)))
