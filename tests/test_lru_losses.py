"""lru plugin, the loss terms: formulas (stability, Hoyer-square sparsity, ponder), weights from
the config, padding left out, gradients (a zero weight removes a term's), logging by a real SFT
run, and no effect on other models."""
import json

import pytest
import torch

from metareason import Kernel
from metareason.config import ConfigError
from metareason.train.sft import collect_extra_losses, token_loss
from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM, LatentReasoningUnit, LRUConfig
from metareason.plugins.lru.losses import hoyer_square, lru_loss_terms
from metareason.plugins.lru.lru import LRUOutput
from metareason.plugins.lru.stats import LRUForwardStats, LRULayerStats
from tests.conftest import TINY_LLAMA

TINY_MLA = dict(model_type="deepseek_mla", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                kv_latent_dim=16, q_latent_dim=24, rope_head_dim=8, lru_max_iterations=4)


def stats_of(residuals, num_iterations, latent=None, ponder=None, mask=None):
    residuals = torch.as_tensor(residuals, dtype=torch.float32)
    n = torch.as_tensor(num_iterations)
    lead = n.shape
    out = LRUOutput(halt_probs=torch.zeros(residuals.shape), num_iterations=n,
                    remainders=torch.zeros(lead), residuals=residuals,
                    ponder_cost=torch.as_tensor(ponder, dtype=torch.float32) if ponder is not None else n.float())
    latent = latent if latent is not None else torch.ones(*lead, 4)
    return LRUForwardStats([LRULayerStats(0, latent, out)], token_mask=mask)


# ------------------------------------------------------------------------------------ formulas
def test_stability_is_the_mean_contraction_ratio():
    # token 0 ran 3 steps (ratios 0.5, 0.5), token 1 ran 2 (ratio 2.0), token 2 ran 1 (no pair)
    s = stats_of([[[4.0, 2.0, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]], [[3, 2, 1]])
    assert lru_loss_terms(s)["stability"].item() == pytest.approx((0.5 + 0.5 + 2.0) / 3, rel=1e-5)


def test_stability_decreases_when_residuals_shrink():
    slow = stats_of([[[4.0, 3.5, 3.0, 2.8]]], [[4]])
    fast = stats_of([[[4.0, 1.0, 0.2, 0.01]]], [[4]])
    growing = stats_of([[[1.0, 2.0, 3.0, 4.0]]], [[4]])
    values = [lru_loss_terms(s)["stability"].item() for s in (fast, slow, growing)]
    assert values == sorted(values) and values[0] < 0.3 < 1.0 < values[2]


def test_stability_gradient_does_not_reward_a_bigger_first_step():
    r = torch.tensor([[[2.0, 1.0, 0.5, 0.25]]], requires_grad=True)
    lru_loss_terms(stats_of(r, [[4]]))["stability"].backward()
    assert r.grad[0, 0, 0] == 0  # stop-gradient on the denominator
    assert (r.grad[0, 0, 1:] > 0).all()  # later residuals are pushed down


def test_hoyer_square_sparsity():
    d = 8
    one_hot = torch.zeros(d)
    one_hot[3] = 5.0
    assert hoyer_square(one_hot).item() == pytest.approx(1 / d, rel=1e-4)
    assert hoyer_square(torch.full((d,), -2.0)).item() == pytest.approx(1.0, rel=1e-4)
    s = stats_of([[[1.0, 0.0]]], [[1]], latent=one_hot[None, None])
    assert lru_loss_terms(s)["sparsity"].item() == pytest.approx(1 / d, rel=1e-4)


def test_ponder_is_mean_n_plus_r_and_padding_is_left_out():
    mask = torch.tensor([[True, True, False]])
    s = stats_of([[[1.0, 1.0], [1.0, 0.5], [9.0, 9.0]]], [[1, 2, 2]], ponder=[[1.5, 2.25, 100.0]], mask=mask)
    terms = lru_loss_terms(s)
    assert terms["ponder"].item() == pytest.approx((1.5 + 2.25) / 2)
    assert terms["stability"].item() == pytest.approx(0.5)  # the padding token's ratio (1.0) is out


def test_ponder_gradient_reaches_the_halting_unit():
    lru = LatentReasoningUnit(LRUConfig(latent_dim=8, max_iterations=6))
    _, out = lru(torch.randn(3, 5, 8))
    out.ponder_cost.mean().backward()
    assert lru.b_p.grad is not None and lru.b_p.grad != 0 and lru.w_p.grad.abs().sum() > 0


def test_optimising_stability_makes_the_lru_converge():
    torch.manual_seed(0)
    lru = LatentReasoningUnit(LRUConfig(latent_dim=16, max_iterations=6, fixed_iterations=True, init_gain=2.0))
    x = torch.randn(64, 16)
    opt = torch.optim.Adam(lru.parameters(), lr=2e-2)

    def ratio():
        _, out = lru(x)
        return lru_loss_terms(LRUForwardStats([LRULayerStats(0, x, out)]))["stability"]

    before = ratio().item()
    for _ in range(30):
        opt.zero_grad()
        ratio().backward()
        opt.step()
    assert ratio().item() < 0.75 * before


# ----------------------------------------------------------------------------- model and hook
def model_and_batch(seed=0, **kw):
    torch.manual_seed(seed)
    arch = dict(TINY_MLA)
    arch.pop("model_type")
    model = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(vocab_size=30, **dict(arch, **kw)))
    ids = torch.randint(3, 30, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_forward_with_labels_adds_the_weighted_terms():
    model, batch = model_and_batch(lru_loss_weights={"stability": 0.5, "sparsity": 0.25, "ponder": 2.0})
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    t = out.aux_losses
    expected = out.lm_loss + 0.5 * t["stability"] + 0.25 * t["sparsity"] + 2.0 * t["ponder"]
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(t["ponder"], lru_loss_terms(out.lru_stats, batch["attention_mask"])["ponder"])


def hook_kernel(**weights):
    overrides = [f"lru.loss_weights.{k}={v}" for k, v in weights.items()]
    return Kernel({"plugins": ["lru"], "quiet": True}, overrides=overrides)


def hook_terms(kernel, model, batch):
    out = model(input_ids=batch["input_ids"], use_cache=False)  # as the SFT loop calls it
    return out, collect_extra_losses(kernel, model, batch, out, step=0)


def test_hook_returns_named_terms_with_config_weights():
    model, batch = model_and_batch()
    out, terms = hook_terms(hook_kernel(stability=0.3, ponder=0.02), model, batch)
    assert set(terms) == {"L_pred", "L_stability", "L_sparsity", "L_ponder"}
    assert [terms[k][0] for k in ("L_pred", "L_stability", "L_sparsity", "L_ponder")] == [0.0, 0.3, 0.01, 0.02]
    # L_pred is the kernel's token loss; its default weight 1 is already in the kernel's loss
    assert terms["L_pred"][1].item() == pytest.approx(token_loss(out.logits, batch["labels"])[0].item())
    # padding of the batch (row 1 from position 7) is left out of the terms
    expected = lru_loss_terms(out.lru_stats, batch["attention_mask"])
    for name in ("stability", "sparsity", "ponder"):
        assert torch.equal(terms[f"L_{name}"][1], expected[name])
    assert not torch.equal(expected["ponder"], lru_loss_terms(out.lru_stats)["ponder"])


def grads(kernel=None, seed=0):
    """Parameter gradients of token loss + the hook's weighted terms (none without a kernel)."""
    model, batch = model_and_batch(seed)
    out = model(input_ids=batch["input_ids"], use_cache=False)
    loss = token_loss(out.logits, batch["labels"])[0]
    if kernel is not None:
        for weight, term in collect_extra_losses(kernel, model, batch, out, step=0).values():
            loss = loss + weight * term
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_zero_weight_removes_the_terms_gradient():
    plain = grads()
    zero = grads(hook_kernel(stability=0, sparsity=0, ponder=0))
    for name in plain:
        torch.testing.assert_close(zero[name], plain[name], rtol=0, atol=1e-7)
    for term in ("stability", "sparsity", "ponder"):
        weights = {**dict(stability=0, sparsity=0, ponder=0), term: 1.0}
        changed = grads(hook_kernel(**weights))
        assert not torch.allclose(changed["model.layers.0.self_attn.lru.W"], plain["model.layers.0.self_attn.lru.W"]), term


def test_pred_weight_scales_the_token_loss():
    model, batch = model_and_batch()
    out, terms = hook_terms(hook_kernel(pred=2.5), model, batch)
    weight, term = terms["L_pred"]
    assert weight == 1.5 and term.requires_grad  # kernel's 1 + 1.5 = 2.5


def test_no_terms_for_other_models_or_without_lru():
    from transformers import AutoConfig, AutoModelForCausalLM

    kernel = hook_kernel()
    arch = dict(TINY_LLAMA)
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), vocab_size=30, **arch))
    _, batch = model_and_batch()
    out = llama(input_ids=batch["input_ids"])
    assert collect_extra_losses(kernel, llama, batch, out, 0) == {}
    model, batch = model_and_batch(use_lru=False)
    _, terms = hook_terms(kernel, model, batch)
    assert set(terms) == {"L_pred"}


def test_bad_weight_is_a_config_error():
    with pytest.raises(ConfigError, match=r"lru\.loss_weights\.ponder"):
        hook_kernel(ponder=-1)


def test_sft_run_logs_each_term(tmp_path):
    arch = dict(TINY_MLA, lru_max_iterations=3)
    cfg = {"name": "lossrun", "output_dir": str(tmp_path), "plugins": ["lru"], "quiet": True,
           "model": {"arch": arch, "tokenizer": {"type": "char"}},
           "data": {"max_length": 96, "train": [{"task": "causal_loop", "num_samples": 24, "params": {"levels": [1, 2]}}]},
           "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "lr": 1e-3},
           "lru": {"loss_weights": {"stability": 0.2}}}
    Kernel(cfg).run()
    rows = [json.loads(line) for line in (tmp_path / "lossrun" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 3
    for r in train:
        for name in ("L_pred", "L_stability", "L_sparsity", "L_ponder"):
            assert isinstance(r[f"train/{name}"], float)
        assert r["train/L_pred"] == pytest.approx(r["train/lm_loss"], rel=1e-5)
        extra = 0.2 * r["train/L_stability"] + 0.01 * r["train/L_sparsity"] + 0.001 * r["train/L_ponder"]
        assert r["train/loss"] == pytest.approx(r["train/lm_loss"] + extra, rel=1e-5)
