"""The RL objectives beyond grpo/dr_grpo/dapo (issue 33): bnpo, cispo, sapo, luspo, vespo,
``importance_sampling_level: sequence`` (GSPO) with every loss type, and the entropy bonus, each
checked against TRL 1.16's own ``GRPOTrainer._compute_loss``:

1. exactly (float64) on a stand-in policy whose forward returns log-probs and entropies of fixed
   logits: loss, gradient and logged statistics, with a padded mask and with none, off-policy
   (``num_iterations = 2``, ratios not 1, clipping active), with KL and entropy bonus, on-policy;
2. on a real tiny Llama: ``completion_logps(return_entropy=True)`` + ``grpo_loss`` against TRL's
   fused LM head (float32), loss and every parameter's gradient;
3. micro-batches with ``grad_accum = 2`` sum to TRL's accumulated step (and, where the loss
   type's step loss is a whole-step quantity, to the one-batch loss);
4. the CSPO control mask composes with each: exactly zero gradient outside control segments;
5. the loop passes every new option (and the entropies of its own forward) to the loss.

Plus identities at ratio 1 that need no TRL, the entropy itself, and config errors."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from metareason import Kernel, hookimpl
from metareason.config import ConfigError
from metareason.train.grpo_loss import completion_logps, group_advantages, grpo_loss, token_logps

pytestmark = pytest.mark.timeout(600)

F64 = torch.float64
N, G, T, V = 6, 3, 5, 7
EPS = 0.2
MAX_LEN = 8
MASK = torch.tensor([[1, 1, 1, 1, 1],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0],  # fully masked row
                     [1, 0, 0, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1]], dtype=torch.bool)
FULL = torch.ones(N, T, dtype=torch.bool)
MASKS = {"padded": MASK, "no-mask": FULL}
REWARDS = [1.0, 0.0, 0.5, 2.0, -1.0, 0.25]

# (loss_type, importance_sampling_level): every new objective, GSPO, and the sequence level under
# every loss type; the first three carry the entropy bonus here (their token loss is tested in
# tests/test_grpo_loss.py)
OBJECTIVES = [("bnpo", "token"), ("cispo", "token"), ("sapo", "token"), ("luspo", "sequence"), ("vespo", "token"),
              ("grpo", "sequence"), ("bnpo", "sequence"), ("dr_grpo", "sequence"), ("dapo", "sequence"),
              ("cispo", "sequence"), ("sapo", "sequence"), ("luspo", "token"), ("vespo", "sequence"),
              ("grpo", "token"), ("dr_grpo", "token"), ("dapo", "token")]
IDS = [f"{lt}-{lvl}" for lt, lvl in OBJECTIVES]
# a whole-step token mean or sequence mean: micro-batches sum to the one-batch loss
STEP_DEFINED = ("grpo", "sapo", "luspo", "dr_grpo", "dapo", "cispo", "vespo")


def options(loss_type, level, **kw):
    """Objective options for both sides (TRL's names). sapo's negative temperature is one float32
    represents exactly (TRL builds the temperatures in float32; the default 1.05 is not)."""
    out = dict(loss_type=loss_type, importance_sampling_level=level, epsilon=EPS,
               epsilon_high=1.2 if loss_type == "cispo" else 0.28, sapo_temperature_pos=1.0,
               sapo_temperature_neg=1.25, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
               vespo_lambda_neg=2.0, beta=0.0, entropy_coef=0.0)
    out.update(kw)
    return out


def ours(logps, old, ref, adv, mask, entropies, opts, **kw):
    return grpo_loss(logps, old, ref, adv, mask, max_completion_length=MAX_LEN, entropies=entropies, **opts, **kw)


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g, dtype=F64) * 1.5
    ids = torch.randint(0, V, (N, T), generator=g)
    shift_old = (torch.rand(N, T, generator=g, dtype=F64) - 0.5) * 0.9  # ratios in [0.64, 1.57]
    shift_ref = (torch.rand(N, T, generator=g, dtype=F64) - 0.5) * 1.2
    return logits, ids, shift_old, shift_ref


def logps_entropy(logits, ids, temperature):
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- TRL harness
class StandIn(torch.nn.Module):
    """A policy for TRL whose forward returns, the way TRL's fused LM head does, the log-probs of
    the shifted labels (0 where the label is -100) and the entropies of fixed logits."""

    def __init__(self, logits, temperature):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, **_):
        assert fused_lm_head
        n_rows, n_comp = self.logits.shape[:2]
        comp = labels[:, 1:][:, -n_comp:]
        logp, entropy = logps_entropy(self.logits, comp.clamp(min=0), self.temperature)
        lead = torch.zeros(n_rows, labels.shape[1] - 1 - n_comp, dtype=F64)
        return SimpleNamespace(log_probs=torch.cat([lead, logp.masked_fill(comp == -100, 0.0)], 1),
                               entropy=torch.cat([lead, entropy], 1))


def trl_trainer(tmp_path, model_dir, grad_accum=1, **grpo_args):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=N, num_generations=G,
                      max_completion_length=MAX_LEN, use_cpu=True, bf16=False, report_to="none",
                      gradient_checkpointing=False, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                      gradient_accumulation_steps=grad_accum, model_init_kwargs={"dtype": torch.float32},
                      **grpo_args)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "A=1;A=?"}] * N),
                          processing_class=AutoTokenizer.from_pretrained(str(model_dir)))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = grad_accum  # set by Trainer's loop
    return trainer


def trl_inputs(ids, mask, adv, old, ref, num_items, prompt=None):
    prompt = torch.full((ids.shape[0], 3), 5, dtype=torch.long) if prompt is None else prompt
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": ids,
              "completion_mask": mask.long(), "advantages": adv, "num_items_in_batch": torch.tensor(num_items)}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


VARIANTS = {  # num_iterations, beta, entropy_coef
    "off-policy": (2, 0.0, 0.0),
    "off-policy+kl+entropy": (2, 0.05, 0.03),
    "on-policy": (1, 0.0, 0.0),
}


# --------------------------------------------------------------------------- 1. TRL, exact
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("loss_type,level", OBJECTIVES, ids=IDS)
def test_loss_and_gradient_equal_trl_exactly(tmp_path, tiny_model_dir, loss_type, level, mask_kind, variant):
    iterations, beta, entropy_coef = VARIANTS[variant]
    temperature = 0.7
    opts = options(loss_type, level, beta=beta, entropy_coef=entropy_coef)
    trainer = trl_trainer(tmp_path, tiny_model_dir, num_iterations=iterations, temperature=temperature, **opts)
    mask = MASKS[mask_kind]
    logits, ids, shift_old, shift_ref = case(2)
    lp0, _ = logps_entropy(logits, ids, temperature)
    old = lp0 + shift_old if iterations > 1 else None
    ref = lp0 + shift_ref if beta else None
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")

    theirs = StandIn(logits, temperature)
    trl_loss = trainer._compute_loss(theirs, trl_inputs(ids, mask, adv, old, ref, int(mask.sum())))
    trl_loss.backward()

    x = logits.clone().requires_grad_(True)
    lp, ent = logps_entropy(x, ids, temperature)
    loss, stats = ours(lp, old, ref, adv, mask, ent, opts, num_items=int(mask.sum()))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(x.grad, theirs.logits.grad, rtol=1e-10, atol=1e-15)
    assert (x.grad * ~mask[..., None]).abs().max() == 0 and x.grad[mask].abs().sum() > 0

    logged = trainer._metrics["train"]  # TRL reduces its statistics in float32
    names = {"cispo": ["cispo_clip_ratio"], "sapo": [], "vespo": ["vespo/phi_seq_mean"]}.get(
        loss_type, ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"])
    for key in names + ["entropy"] + (["kl"] if beta else []):
        assert float(stats[key]) == pytest.approx(logged[key][-1], rel=1e-6, abs=1e-9), key
    if iterations > 1:  # the case really is off-policy: the objective's own weighting acts
        if loss_type == "cispo" and level == "token":
            assert 0 < float(stats["cispo_clip_ratio"]) < 1
        elif loss_type == "vespo":
            assert abs(float(stats["vespo/phi_seq_mean"]) - 1) > 1e-3
        elif loss_type not in ("cispo", "sapo") and level == "token":
            assert float(stats["clip_ratio/region_mean"]) > 0


# --------------------------------------------------------------------------- 2. TRL, real model
@pytest.fixture(scope="module")
def real_case(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 60, (N, T), generator=g)
    prompt = torch.randint(4, 60, (N, 4), generator=g)
    with torch.no_grad():
        lp0 = completion_logps(model, torch.cat([prompt, ids], 1), None, T, temperature=0.8)
    old = lp0 + (torch.rand(N, T, generator=g) - 0.5) * 0.9
    ref = lp0 + (torch.rand(N, T, generator=g) - 0.5) * 1.2
    return model, prompt, ids, old, ref


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("loss_type,level", OBJECTIVES[:13], ids=IDS[:13])
def test_real_model_loss_and_parameter_gradients_equal_trl(tmp_path, tiny_model_dir, real_case, loss_type, level,
                                                           mask_kind):
    model, prompt, ids, old, ref = real_case
    mask = MASKS[mask_kind]
    opts = options(loss_type, level, beta=0.05, entropy_coef=0.02, sapo_temperature_neg=1.05)  # TRL's defaults
    trainer = trl_trainer(tmp_path, tiny_model_dir, num_iterations=2, temperature=0.8, **opts)  # the same weights
    adv = group_advantages(torch.tensor(REWARDS), G, "group")
    inputs = trl_inputs(ids, mask, adv, old, ref, int(mask.sum()), prompt=prompt)
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    model.zero_grad()
    attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    lp, ent = completion_logps(model, torch.cat([prompt, ids], 1), attn, T, temperature=0.8, return_entropy=True)
    loss, _ = ours(lp, old, ref, adv, mask, ent, opts, num_items=int(mask.sum()))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-7)
    theirs = dict(trainer.model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert model.lm_head.weight.grad.abs().max() > 1e-4  # a gradient to compare, not zeros


# --------------------------------------------------------------------------- 3. micro-batches
@pytest.mark.parametrize("loss_type,level", OBJECTIVES, ids=IDS)
def test_micro_batches_sum_to_trls_accumulated_step(tmp_path, tiny_model_dir, loss_type, level):
    """Two micro-batches with uneven token counts (8 and 10), ``grad_accum = 2``: our parts sum to
    TRL's two accumulated ``_compute_loss`` calls (loss and gradient); a loss type whose step is a
    whole-step mean also sums to the one-batch loss (bnpo's is per micro-batch, as TRL's)."""
    opts = options(loss_type, level, beta=0.05, entropy_coef=0.03)
    trainer = trl_trainer(tmp_path, tiny_model_dir, grad_accum=2, num_iterations=2, temperature=1.0, **opts)
    logits, ids, shift_old, shift_ref = case(1)
    lp0, _ = logps_entropy(logits, ids, 1.0)
    old, ref = lp0 + shift_old, lp0 + shift_ref
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")
    halves, items = (slice(0, 3), slice(3, 6)), int(MASK.sum())

    x = logits.clone().requires_grad_(True)
    trl_total, our_total, trl_grads = 0.0, 0.0, []
    for s in halves:
        theirs = StandIn(logits[s], 1.0)
        part = trainer._compute_loss(theirs, trl_inputs(ids[s], MASK[s], adv[s], old[s], ref[s], items))
        part.backward()
        trl_total, trl_grads = trl_total + float(part.detach()), trl_grads + [theirs.logits.grad]
        lp, ent = logps_entropy(x[s], ids[s], 1.0)
        mine, _ = ours(lp, old[s], ref[s], adv[s], MASK[s], ent, opts, num_items=items, grad_accum=2)
        mine.backward()
        our_total += float(mine.detach())
    assert our_total == pytest.approx(trl_total, rel=1e-12)
    torch.testing.assert_close(x.grad, torch.cat(trl_grads), rtol=1e-10, atol=1e-15)

    no_bonus = dict(opts, entropy_coef=0.0)  # the bonus is a per-micro-batch mean, as TRL's
    lp, ent = logps_entropy(logits, ids, 1.0)
    whole = float(ours(lp, old, ref, adv, MASK, ent, no_bonus)[0])
    parts = sum(float(ours(lp[s], old[s], ref[s], adv[s], MASK[s], ent[s], no_bonus, num_items=items,
                           grad_accum=2)[0]) for s in halves)
    if loss_type in STEP_DEFINED:
        assert parts == pytest.approx(whole, rel=1e-12)
    else:  # bnpo: each micro-batch's own token mean
        assert abs(parts - whole) > 1e-6


# --------------------------------------------------------------------------- 4. CSPO mask
@pytest.fixture(scope="module")
def cspo_batch():
    from metareason.models import build_char_tokenizer
    from metareason.models.special_tokens import add_special_tokens
    from metareason.plugins.cspo import CONTROL_CLOSE, CONTROL_OPEN, control_mask

    tok = build_char_tokenizer()
    add_special_tokens(tok, None, [CONTROL_OPEN, CONTROL_CLOSE])
    texts = ["B=1+2=3;wait<control>conclude</control>answer:3",
             "B=1+2=3;check<control>continue</control>:B=1+2=3;answer:3",
             "B=1+2=4;<control>revise</control>B=1+2=3;answer:3",
             "B=1+2=3;wait<control>continue"]  # unclosed: not a segment, not trained
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    completion_mask = ids != tok.pad_token_id
    return tok, ids, completion_mask, control_mask(ids, tok) & completion_mask


@pytest.mark.parametrize("loss_type,level", OBJECTIVES, ids=IDS)
def test_cspo_control_mask_composes_with_the_objective(cspo_batch, loss_type, level):
    """Off-policy, with KL and the entropy bonus: no gradient outside control segments; the
    same objective without the mask trains the reasoning tokens too."""
    tok, ids, completion_mask, cmask = cspo_batch
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*ids.shape, len(tok), generator=g)
    shift_old, shift_ref = torch.randn(*ids.shape, generator=g) * 0.3, torch.randn(*ids.shape, generator=g) * 0.3
    adv = group_advantages(torch.tensor([1.0, 0.2, 0.5, -1.0]), 4, "group")
    opts = options(loss_type, level, beta=0.04, entropy_coef=0.01)

    def grad(mask):
        x = logits.clone().requires_grad_(True)
        lp, ent = logps_entropy(x, ids, 1.0)
        loss, _ = ours(lp, lp.detach() + shift_old, lp.detach() + shift_ref, adv, mask, ent, opts)
        loss.backward()
        return x.grad.abs().sum(-1)

    per_pos = grad(cmask)
    assert torch.all(per_pos[~cmask] == 0), "gradient leaked to a non-control position"
    assert torch.all(per_pos[3] == 0) and torch.all(per_pos[cmask] > 0)
    assert (grad(completion_mask)[completion_mask & ~cmask] > 0).all()


@pytest.mark.parametrize("loss_type,level", OBJECTIVES[:13], ids=IDS[:13])
def test_cspo_kernel_mask_on_a_real_model_gives_no_gradient_outside_control(cspo_real, loss_type, level):
    """The kernel's mask assembly with the cspo plugin, log-probs and entropies from the real
    model's forward: the logits get no gradient outside control segments."""
    model, ids, mask, input_ids, attention, old = cspo_real
    lp, ent, outputs = completion_logps(model, input_ids, attention, ids.shape[1], return_entropy=True,
                                        return_outputs=True)
    outputs.logits.retain_grad()
    adv = group_advantages(torch.tensor([1.0, 0.2, 0.5, -1.0]), 4, "group")
    loss, _ = ours(lp, old, None, adv, mask, ent, options(loss_type, level, entropy_coef=0.01))
    loss.backward()
    per_pos = outputs.logits.grad[:, :-1].abs().sum(-1)  # the logits that predict each completion token
    assert torch.all(per_pos[~mask] == 0) and torch.all(per_pos[mask] > 0)


@pytest.fixture(scope="module")
def cspo_real(tiny_model_dir):
    from metareason.generation.generate import encode_prompts
    from metareason.plugins.cspo import control_mask
    from metareason.train.grpo import rl_loss_mask

    torch.manual_seed(0)
    kernel = Kernel({"plugins": ["cspo"], "model": {"path": str(tiny_model_dir)}, "cspo": {"enabled": True}})
    model, tok = kernel.load()
    texts = ["B=1+2=3;wait<control>conclude</control>answer:3", "B=1+2=3;<control>continue</control>:3",
             "B=1+2=4;<control>revise</control>B=1+2=3;answer:3", "B=1+2=3;wait<control>continue"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    completion_mask = ids != tok.pad_token_id
    mask = rl_loss_mask(kernel, ids, completion_mask, tok)
    assert torch.equal(mask, control_mask(ids, tok) & completion_mask) and mask.any()
    prompts = encode_prompts(tok, ["A=1;B=A+2;B=?"] * len(texts), torch.device("cpu"))
    input_ids = torch.cat([prompts["input_ids"], ids], 1)
    attention = torch.cat([prompts["attention_mask"], completion_mask.long()], 1)
    with torch.no_grad():
        old = completion_logps(model, input_ids, attention, ids.shape[1]) + torch.randn(ids.shape) * 0.3
    return model, ids, mask, input_ids, attention, old


# --------------------------------------------------------------------------- identities at ratio 1
def test_on_policy_every_objective_is_the_policy_gradient():
    """At ratio 1 (``num_iterations = 1``) every objective's gradient is ``-A∇log π`` under its
    aggregation: the token means (bnpo, dapo, cispo, vespo) agree, the sequence means (grpo, sapo,
    GSPO) agree, luspo is the sequence sum / B; the sequence ratio of GSPO is the exponent of the
    mean token log-ratio (not of the sum)."""
    logits, ids, shift_old, _ = case(5)
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")

    def grad(loss_type, level="token", old_shift=None, **kw):
        x = logits.clone().requires_grad_(True)
        lp, ent = logps_entropy(x, ids, 1.0)
        old = None if old_shift is None else lp.detach() + old_shift
        loss, stats = ours(lp, old, None, adv, MASK, ent, options(loss_type, level, **kw))
        loss.backward()
        return x.grad, stats

    token_mean = grad("dapo")[0]
    for lt in ("bnpo", "cispo", "vespo"):
        torch.testing.assert_close(grad(lt)[0], token_mean, rtol=1e-12, atol=1e-15, msg=lt)
    seq_mean = grad("grpo")[0]
    for lt, lvl in (("sapo", "token"), ("grpo", "sequence"), ("sapo", "sequence")):
        torch.testing.assert_close(grad(lt, lvl)[0], seq_mean, rtol=1e-12, atol=1e-15, msg=f"{lt}-{lvl}")
    lens = MASK.sum(-1).clamp(min=1).to(F64)
    torch.testing.assert_close(grad("luspo", "sequence")[0], seq_mean * lens[:, None, None], rtol=1e-12, atol=1e-15)
    # off-policy GSPO: one ratio per row, exp(mean log-ratio), clipped as a whole
    shift = torch.zeros(N, T, dtype=F64)
    shift[0] = -0.3  # row 0: mean log-ratio 0.3 -> ratio e^0.3 > 1.28: clipped, no gradient (A > 0)
    shift[1] = torch.tensor([-0.6, 0.6, -0.3, 5.0, 5.0], dtype=F64)  # mean over its 3 loss tokens: 0.1
    g, stats = grad("grpo", "sequence", old_shift=shift)
    assert adv[0] > 0 and g[0].abs().max() == 0
    assert adv[1] < 0 and g[1].abs().sum() > 0  # ratio e^0.1 inside [0.8, 1.28]: the gradient flows
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(1 / N)


def test_cispo_weight_is_the_detached_capped_ratio():
    """cispo: gradient ``-min(ρ, ε_high)·A·∇log π`` per token — the capped ratio is a weight, not
    a function of θ, and it is capped only above (no lower clip, no min over two terms)."""
    logits, ids, shift_old, _ = case(6)
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")
    x = logits.clone().requires_grad_(True)
    lp, ent = logps_entropy(x, ids, 1.0)
    old = lp.detach() + shift_old
    loss, _ = ours(lp, old, None, adv, MASK, ent, options("cispo", "token", epsilon_high=1.2))
    (d_lp,) = torch.autograd.grad(loss, lp)
    ratio = torch.exp(-shift_old)
    want = -torch.clamp(ratio, max=1.2) * adv[:, None] * MASK / MASK.sum()
    torch.testing.assert_close(d_lp, want, rtol=1e-12, atol=1e-15)
    assert bool(((ratio < 0.8) & MASK).any()) and bool(((ratio > 1.2) & MASK).any())


def test_sapo_gate_is_a_soft_sigmoid_with_the_sign_temperature():
    """sapo: ``dℓ/dρ = -4σ(τ(ρ-1))(1-σ(τ(ρ-1)))·A``: 1 at ρ = 1, fading off-policy, with τ from the
    advantage's sign."""
    rho = torch.tensor([[0.5, 1.0, 1.6]], dtype=F64).expand(2, 3).contiguous()
    log_rho = rho.log().requires_grad_(True)
    adv = torch.tensor([1.5, -2.0], dtype=F64)
    loss, _ = grpo_loss(log_rho, torch.zeros_like(rho), None, adv, torch.ones(2, 3, dtype=torch.bool), epsilon=EPS,
                        epsilon_high=None, beta=0.0, loss_type="sapo", max_completion_length=3,
                        sapo_temperature_pos=2.0, sapo_temperature_neg=8.0)
    (d,) = torch.autograd.grad(loss, log_rho)
    tau = torch.tensor([[2.0], [8.0]], dtype=F64)
    s = torch.sigmoid(tau * (rho - 1))
    want = -4 * s * (1 - s) * adv[:, None] * rho / (2 * 3)  # d/dlogρ = ρ d/dρ; grpo aggregation
    torch.testing.assert_close(d, want, rtol=1e-12, atol=1e-15)
    assert d[1, 1] == pytest.approx(2.0 / 6)


def test_vespo_weight_is_the_gamma_of_the_sequence_ratio():
    """vespo: ``φ(w) = exp(λ + k log w − λw)`` of ``w = exp(Σ_t m_t log ρ_t)``, detached,
    ``(k, λ)`` by the advantage's sign, ``φ(1) = 1``."""
    from metareason.train.grpo_loss import vespo_weights

    log_ratio = torch.tensor([[0.1, -0.2, 0.4], [0.3, 0.3, 9.0], [0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=F64)
    adv = torch.tensor([[1.0], [-1.0], [0.0]], dtype=F64)
    phi = vespo_weights(log_ratio, mask, adv, 2.0, 3.0, 3.0, 2.0)
    w = torch.tensor([math.exp(0.3), math.exp(0.6), 1.0], dtype=F64)
    k, lam = torch.tensor([2.0, 3.0, 2.0], dtype=F64), torch.tensor([3.0, 2.0, 3.0], dtype=F64)
    torch.testing.assert_close(phi.squeeze(1), torch.exp(lam + k * w.log() - lam * w), rtol=1e-13, atol=0)
    assert float(phi[2]) == pytest.approx(1.0) and not phi.requires_grad


# --------------------------------------------------------------------------- the entropy itself
def test_token_entropy_is_the_sampling_distributions_and_differentiable():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 4), generator=g)
    lp, ent = token_logps(logits, ids, temperature=0.6, chunk_tokens=5, return_entropy=True)
    want_lp, want_ent = logps_entropy(logits, ids, 0.6)
    torch.testing.assert_close(lp, want_lp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ent, want_ent, rtol=1e-13, atol=1e-13)
    (got,) = torch.autograd.grad(ent.sum(), logits)
    (want,) = torch.autograd.grad(want_ent.sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_shared_prompt_forward_gives_the_same_entropies(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from metareason.train.grpo_loss import shared_prompt_logps

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, 60, (2, 5), generator=g)[[0, 0, 1, 1]]
    ids = torch.cat([prompts, torch.randint(4, 60, (4, 4), generator=g)], 1)
    a = completion_logps(model, ids, torch.ones_like(ids), 4, temperature=0.9, return_entropy=True)
    b = shared_prompt_logps(model, ids, torch.ones_like(ids), 4, temperature=0.9, return_entropy=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_entropy_bonus_is_minus_coef_times_the_mean_token_entropy():
    """TRL's form: the same bonus under every loss type, a per-micro-batch token mean / grad_accum."""
    logits, ids, shift_old, _ = case(7)
    lp, ent = logps_entropy(logits, ids, 1.0)
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")
    mean = float((ent * MASK).sum() / MASK.sum())
    for lt, lvl in OBJECTIVES:
        base = float(ours(lp, lp + shift_old, None, adv, MASK, ent, options(lt, lvl), grad_accum=2)[0])
        bonus = float(ours(lp, lp + shift_old, None, adv, MASK, ent, options(lt, lvl, entropy_coef=0.1),
                           grad_accum=2)[0])
        assert bonus - base == pytest.approx(-0.1 * mean / 2, rel=1e-12), lt
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(lp, None, None, adv, MASK, epsilon=EPS, epsilon_high=None, beta=0.0, loss_type="dapo",
                  max_completion_length=MAX_LEN, entropy_coef=0.1)


# --------------------------------------------------------------------------- 5. the loop
def _tiny(tmp_path, name, rl, **train):
    from tests.conftest import TINY_LLAMA

    return {"name": name, "output_dir": str(tmp_path), "plugins": [], "quiet": True,
            "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
            "data": {"train": [{"task": "causal_loop", "num_samples": 16, "params": {"levels": [1]}}]},
            "train": dict({"algorithm": "grpo", "max_steps": 2, "batch_size": 2, "lr": 3e-3, "log_every": 1,
                           "save_every": 0, "schedule": "constant", "seed": 3}, **train),
            "rl": dict({"num_generations": 4, "rewards": {"digits": 1.0}, "max_completion_length": 8}, **rl),
            "generation": {"max_new_tokens": 6, "batch_size": 16}, "eval": {"at_end": False}}


class Digits:
    @hookimpl
    def metareason_register_rewards(self, register):
        register("digits", lambda completions, examples: [sum(c.isdigit() for c in s) / max(len(s), 1)
                                                          for s in completions])


NON_DEFAULT = {"loss_type": "vespo", "importance_sampling_level": "sequence", "entropy_coef": 0.05,
               "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.3, "vespo_k_pos": 1.5,
               "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5}


def _steps(k):
    rows = [json.loads(line) for line in (k.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def test_the_loop_passes_every_objective_option_and_its_own_entropies(tmp_path, monkeypatch, capsys):
    import metareason.train.grpo as grpo

    calls = []

    def spy(logps, *args, **kwargs):
        calls.append((logps, kwargs))
        return grpo_loss(logps, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    k = Kernel(_tiny(tmp_path, "opts", dict(NON_DEFAULT, num_iterations=2), grad_accum=2))
    k.register(Digits(), name="digits")
    k.run()
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    for logps, kwargs in calls:
        for key, value in NON_DEFAULT.items():
            assert kwargs[key] == value, key
        ent = kwargs["entropies"]
        assert ent.shape == logps.shape and ent.requires_grad and bool((ent > 0).all())  # the training forward's
    rows = _steps(k)
    assert len(rows) == 2 and all(r["rl/entropy"] > 0 and "rl/vespo/phi_seq_mean" in r for r in rows)
    assert "vespo computes its own sequence weight" in capsys.readouterr().err


@pytest.mark.parametrize("loss_type", ["bnpo", "cispo", "sapo", "luspo"])
def test_each_loss_type_runs_in_the_loop(tmp_path, loss_type):
    k = Kernel(_tiny(tmp_path, loss_type, {"loss_type": loss_type, "importance_sampling_level": "sequence",
                                           "num_iterations": 2, "epsilon_high": 5.0}, max_steps=2))
    k.register(Digits(), name="digits")
    k.run()
    rows = _steps(k)
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)


def test_no_entropy_is_computed_without_the_bonus(tmp_path, monkeypatch):
    import metareason.train.grpo as grpo

    seen = []
    monkeypatch.setattr(grpo, "grpo_loss", lambda *a, **kw: (seen.append(kw["entropies"]), grpo_loss(*a, **kw))[1])
    k = Kernel(_tiny(tmp_path, "plain", {}, max_steps=1))
    k.register(Digits(), name="digits")
    k.run()
    assert seen == [None]


@pytest.mark.parametrize("rl,match", [
    ({"loss_type": "ppo"}, r"rl\.loss_type: "),
    ({"importance_sampling_level": "batch"}, r"rl\.importance_sampling_level: "),
    ({"sapo_temperature_neg": 0}, r"rl\.sapo_temperature_neg: "),
    ({"vespo_lambda_pos": -1}, r"rl\.vespo_lambda_pos: "),
])
def test_config_errors_name_the_field(tmp_path, rl, match):
    with pytest.raises(ConfigError, match=match) as err:
        Kernel(_tiny(tmp_path, "bad", rl))
    assert "\n" not in str(err.value)


def test_trls_warnings_are_notes():
    from metareason.config import RLConfig
    from metareason.train.grpo import objective_notes

    assert objective_notes(RLConfig()) == []
    assert "luspo" in objective_notes(RLConfig(loss_type="luspo"))[0]
    assert objective_notes(RLConfig(loss_type="luspo", importance_sampling_level="sequence")) == []
    gspo_note = objective_notes(RLConfig(loss_type="dapo", importance_sampling_level="sequence"))
    assert "GSPO is loss_type grpo" in gspo_note[0]
    assert "5.0" in objective_notes(RLConfig(loss_type="cispo"))[0]
    assert objective_notes(RLConfig(loss_type="cispo", epsilon_high=5.0)) == []
