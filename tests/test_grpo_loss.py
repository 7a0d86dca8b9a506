"""The GRPO objective: group advantages, the clipped loss with KL and its three aggregations,
checked three ways on one tiny case (fixed logits, rewards, masks with padding and a fully
masked row):

1. against hand-written formulas (plain Python loops over rows and tokens, float64): loss and
   the gradient with respect to the logits;
2. against TRL 1.16's own ``GRPOTrainer._compute_loss`` on the same logits (a stand-in model
   whose forward returns those log-probs, float64): loss, gradient and clip/KL statistics;
3. end to end on a real tiny Llama: ``completion_logps`` + ``grpo_loss`` against TRL's
   ``_compute_loss`` (TRL's LM head runs in float32, hence the tolerance there).

Plus: micro-batches with ``grad_accum`` sum to the full-batch loss for every loss type, and the
``metareason_rl_loss_mask`` hook gives exactly zero gradient at the positions it masks."""
import math
from types import SimpleNamespace

import pytest
import torch

from metareason import Kernel, hookimpl
from metareason.train.grpo import rl_loss_mask
from metareason.train.grpo_loss import completion_logps, group_advantages, grpo_loss, shared_prompt_logps

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
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]  # second group: zero std


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g, dtype=F64) * 1.5
    ids = torch.randint(0, V, (N, T), generator=g)
    # sampling-time and reference log-probs: near the current ones, far enough to clip some tokens
    shift_old = (torch.rand(N, T, generator=g, dtype=F64) - 0.5) * 0.9
    shift_ref = (torch.rand(N, T, generator=g, dtype=F64) - 0.5) * 1.2
    return logits, ids, shift_old, shift_ref


def logps_of(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- hand formulas
def hand_advantages(rewards, g, scale):
    out = []
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    mean_all = sum(rewards) / len(rewards)
    std_all = math.sqrt(sum((r - mean_all) ** 2 for r in rewards) / (len(rewards) - 1))
    for grp in groups:
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        for r in grp:
            a = r - mean
            if scale == "group":
                a /= std + 1e-4
            elif scale == "batch":
                a /= std_all + 1e-4
            out.append(a)
    return out


def hand_loss_and_grad(logits, ids, old, ref, adv, mask, *, eps_high, beta, loss_type, kl_bias, num_items=None):
    """Loss and d loss / d logits by the formulas, token by token."""
    probs = torch.softmax(logits, -1)
    lp = logps_of(logits, ids)
    n_rows, n_tok = lp.shape
    lo, hi = 1 - EPS, 1 + (EPS if eps_high is None else eps_high)
    items = num_items if num_items is not None else max(int(mask.sum()), 1)
    loss = 0.0
    grad = torch.zeros_like(logits)
    for i in range(n_rows):
        n_i = max(int(mask[i].sum()), 1)
        for t in range(n_tok):
            if not mask[i, t]:
                continue
            x = float(lp[i, t])
            o = x if old is None else float(old[i, t])
            a = adv[i]
            r = math.exp(x - o)
            rc = min(max(r, lo), hi)
            f = -min(r * a, rc * a)
            # d f / d x: the unclipped branch (or both when equal) moves with r; a clipped one does not
            df = -a * r if (r * a <= rc * a or lo <= r <= hi) else 0.0
            if beta:
                d = float(ref[i, t]) - x
                k = math.exp(d) - d - 1
                dk = -math.exp(d) + 1
                if kl_bias:
                    f += beta * k * r
                    df += beta * (dk * r + k * r)
                else:
                    f += beta * k
                    df += beta * dk
            w = {"grpo": 1 / (n_rows * n_i), "dr_grpo": 1 / (n_rows * MAX_LEN), "dapo": 1 / items}[loss_type]
            loss += w * f
            onehot = torch.zeros(logits.shape[-1], dtype=F64)
            onehot[ids[i, t]] = 1
            grad[i, t] = w * df * (onehot - probs[i, t])
    return loss, grad


# --------------------------------------------------------------------------- 1. hand formulas
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_formulas(scale):
    got = group_advantages(torch.tensor(REWARDS, dtype=F64), G, scale)
    torch.testing.assert_close(got, torch.tensor(hand_advantages(REWARDS, G, scale), dtype=F64), rtol=1e-14, atol=1e-14)
    assert got[3:].abs().max() == 0  # a group with equal rewards carries no signal


def test_nan_reward_is_left_out_and_gets_zero_advantage():
    got = group_advantages(torch.tensor([1.0, float("nan"), 0.0, 2.0, 2.0, 3.0], dtype=F64), G, "group")
    assert got[1] == 0 and torch.isfinite(got).all()
    torch.testing.assert_close(got[[0, 2]], torch.tensor([0.5, -0.5], dtype=F64) / (math.sqrt(0.5) + 1e-4))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("beta,kl_bias", [(0.0, True), (0.05, True), (0.05, False)])
@pytest.mark.parametrize("off_policy", [False, True])  # num_iterations > 1: old != current
def test_loss_and_logit_gradients_match_formulas(loss_type, scale, eps_high, beta, kl_bias, off_policy):
    logits, ids, shift_old, shift_ref = case()
    logits.requires_grad_(True)
    lp = logps_of(logits, ids)
    old = (lp.detach() + shift_old) if off_policy else None
    ref = lp.detach() + shift_ref
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, scale)
    loss, stats = grpo_loss(lp, old, ref, adv, MASK, epsilon=EPS, epsilon_high=eps_high, beta=beta,
                            loss_type=loss_type, max_completion_length=MAX_LEN, kl_bias_correction=kl_bias)
    loss.backward()
    want_loss, want_grad = hand_loss_and_grad(logits.detach(), ids, old, ref, adv.tolist(), MASK, eps_high=eps_high,
                                              beta=beta, loss_type=loss_type, kl_bias=kl_bias)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-13, abs=1e-15)
    torch.testing.assert_close(logits.grad, want_grad, rtol=1e-12, atol=1e-15)
    assert logits.grad[2].abs().max() == 0  # the fully masked row
    assert logits.grad[~MASK].abs().max() == 0  # padding
    if off_policy:
        assert float(stats["clip_ratio/region_mean"]) > 0  # the case exercises clipping


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_step_loss(loss_type):
    """grad_accum micro-batches (dapo: normalised by the step's token count) = one big batch."""
    logits, ids, shift_old, shift_ref = case(1)
    lp = logps_of(logits, ids)
    old, ref = lp + shift_old, lp + shift_ref
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")
    kw = dict(epsilon=EPS, epsilon_high=0.28, beta=0.04, loss_type=loss_type, max_completion_length=MAX_LEN)
    whole, _ = grpo_loss(lp, old, ref, adv, MASK, **kw)
    parts = [grpo_loss(lp[s], old[s], ref[s], adv[s], MASK[s], num_items=int(MASK.sum()), grad_accum=2, **kw)[0]
             for s in (slice(0, 3), slice(3, 6))]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-13)


# --------------------------------------------------------------------------- 2. against TRL (exact)
class FixedLogProbs(torch.nn.Module):
    """A stand-in policy for TRL: its forward returns log-probs of fixed logits, the way TRL's
    fused LM head does (``log_probs`` over shifted labels, 0 where the label is -100)."""

    def __init__(self, logits, temperature):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, **_):
        assert fused_lm_head
        n_comp = self.logits.shape[1]
        lab = labels[:, 1:]
        logp = torch.log_softmax(self.logits / self.temperature, -1)
        comp = lab[:, -n_comp:]
        picked = logp.gather(-1, comp.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(comp == -100, 0.0)
        out = torch.zeros(lab.shape, dtype=F64)
        out = torch.cat([out[:, :-n_comp], picked], dim=1)
        entropy = -(logp.exp() * logp).sum(-1)
        entropy = torch.cat([torch.zeros(lab.shape[0], lab.shape[1] - n_comp, dtype=F64), entropy], dim=1)
        return SimpleNamespace(log_probs=out, entropy=entropy)


def trl_trainer(tmp_path, tiny_model_dir, **grpo_args):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=N, num_generations=G,
                      max_completion_length=MAX_LEN, use_cpu=True, bf16=False, report_to="none",
                      gradient_checkpointing=False, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                      model_init_kwargs={"dtype": torch.float64}, **grpo_args)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "A=1;A=?"}] * N),
                          processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by Trainer's loop
    return trainer


def trl_inputs(ids, mask, adv, old, ref, prompt_len=3):
    prompt = torch.full((N, prompt_len), 5, dtype=torch.long)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": ids,
              "completion_mask": mask.long(), "advantages": adv, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("eps_high,beta,off_policy", [(None, 0.0, False), (0.28, 0.0, True), (None, 0.05, False),
                                                      (0.28, 0.05, True)])
def test_matches_trl_compute_loss_exactly(tmp_path, tiny_model_dir, loss_type, eps_high, beta, off_policy):
    temperature = 0.7
    trainer = trl_trainer(tmp_path, tiny_model_dir, loss_type=loss_type, epsilon=EPS, epsilon_high=eps_high,
                          beta=beta, num_iterations=2 if off_policy else 1, temperature=temperature)
    logits, ids, shift_old, shift_ref = case(2)
    lp0 = logps_of(logits / temperature, ids)
    old = lp0 + shift_old if off_policy else None
    ref = lp0 + shift_ref if beta else None
    adv = group_advantages(torch.tensor(REWARDS, dtype=F64), G, "group")

    theirs = FixedLogProbs(logits, temperature)
    trl_loss = trainer._compute_loss(theirs, trl_inputs(ids, MASK, adv, old, ref))
    trl_loss.backward()

    ours_logits = logits.clone().requires_grad_(True)
    loss, stats = grpo_loss(logps_of(ours_logits / temperature, ids), old, ref, adv, MASK, epsilon=EPS,
                            epsilon_high=eps_high, beta=beta, loss_type=loss_type, max_completion_length=MAX_LEN,
                            num_items=int(MASK.sum()))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-13, abs=1e-16)
    torch.testing.assert_close(ours_logits.grad, theirs.logits.grad, rtol=1e-12, atol=1e-16)
    logged = trainer._metrics["train"]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        # TRL reduces its statistics in float32
        assert float(stats[key]) == pytest.approx(logged[key][-1], rel=1e-6, abs=1e-9), key


# --------------------------------------------------------------------------- 3. real model vs TRL
def test_completion_logps_and_loss_match_trl_on_a_real_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = trl_trainer(tmp_path, tiny_model_dir, loss_type="dapo", epsilon=EPS, epsilon_high=0.28, beta=0.05,
                          num_iterations=2, temperature=0.8)
    trainer.model.float()
    ours = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ours.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 60, (N, T), generator=g)
    old = -torch.rand(N, T, generator=g) * 3 - 2
    ref = -torch.rand(N, T, generator=g) * 3 - 2
    adv = group_advantages(torch.tensor(REWARDS), G, "group")
    inputs = trl_inputs(ids, MASK, adv, old, ref, prompt_len=4)
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    full = torch.cat([inputs["prompt_ids"], ids], 1)
    attn = torch.cat([inputs["prompt_mask"], MASK.long()], 1)
    lp = completion_logps(ours, full, attn, T, temperature=0.8)
    loss, _ = grpo_loss(lp, old, ref, adv, MASK, epsilon=EPS, epsilon_high=0.28, beta=0.05, loss_type="dapo",
                        max_completion_length=MAX_LEN, num_items=int(MASK.sum()))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5)
    theirs = dict(trainer.model.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_completion_logps_left_padding_uses_generation_positions(tiny_model_dir):
    """A left-padded prompt scores its completion exactly like the same prompt unpadded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    row = torch.tensor([[1, 40, 41, 42, 50, 51, 52]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], 1)
    a = completion_logps(model, row, torch.ones_like(row), 3)
    b = completion_logps(model, padded, mask, 3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shared_prompt_forward_equals_the_plain_one(tiny_model_dir):
    """Each prompt once, its KV gathered out to its completions: same log-probs and gradients
    (left-padded prompts, a group cut by the micro-batch edge, right-padded completions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    model.train()
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, 60, (3, 6), generator=g)
    pmask = torch.ones_like(prompts)
    prompts[1, :2], pmask[1, :2] = 0, 0  # left padding
    rows = torch.tensor([0, 0, 1, 1, 1, 2, 0])  # groups of 2, 3, 1, then the first prompt again
    comp = torch.randint(4, 60, (len(rows), 5), generator=g)
    cmask = torch.ones_like(comp)
    comp[3, 2:], cmask[3, 2:] = 0, 0
    ids, attn = torch.cat([prompts[rows], comp], 1), torch.cat([pmask[rows], cmask], 1)

    def run(fn):
        model.zero_grad()
        lp = fn(model, ids, attn, 5, temperature=0.9)
        (lp * cmask * torch.arange(1, 6)).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (a, ga), (b, gb) = run(completion_logps), run(shared_prompt_logps)
    torch.testing.assert_close(a[cmask.bool()], b[cmask.bool()], rtol=1e-10, atol=1e-12)
    # Llama's RMSNorm runs in float32 even in a float64 model: a prompt's gradient summed before
    # the norm (shared) or after it (plain) differs at float32 rounding, nothing more
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_shared_forward_that_disagrees_is_not_used(tmp_path, monkeypatch, capsys):
    import metareason.train.grpo as grpo
    from tests.conftest import TINY_LLAMA

    k = Kernel({"plugins": [], "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}}})
    model, _ = k.load()
    ids = torch.randint(4, 60, (4, 9))
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "width": 4}
    tok = k.load()[1]
    chosen = grpo.LogProbs(k, model)
    chosen.decide(model, tok, ["A=1;A=?", "B=22;B=?"], torch.device("cpu"))
    assert chosen.fn is shared_prompt_logps and chosen.shared
    monkeypatch.setattr(grpo, "shared_prompt_logps", lambda *a, **kw: shared_prompt_logps(*a, **kw) + 0.1)
    fallback = grpo.LogProbs(k, model)
    fallback.decide(model, tok, ["A=1;A=?", "B=22;B=?"], torch.device("cpu"))
    assert fallback.fn is completion_logps and not fallback.shared
    assert "using the plain forward" in capsys.readouterr().err
    lazy = grpo.LogProbs(k, model)  # undecided: decides on the first micro-batch it sees
    lazy(model, mb, torch.device("cpu"))
    assert lazy.fn is completion_logps


def test_shared_prefill_samples_what_the_plain_prefill_samples(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metareason.generation.generate import generate_batch

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = ["A=1;A=?"] * 3 + ["B=A*22;C=B+1;C=?"] * 2 + ["A=1;A=?"]  # left padding, groups of 3, 2, 1

    def run(share):
        torch.manual_seed(7)
        return generate_batch(model, tok, rows, max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0,
                              stop=[], return_logprobs=True, generate_kwargs={"top_k": 0}, share_prompts=share)

    plain, shared = run(False), run(True)
    for a, b in zip(plain, shared):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


# --------------------------------------------------------------------------- hook mask
class KeepFirstTwo:
    @hookimpl
    def metareason_rl_loss_mask(self, completion_ids, completion_mask):
        keep = torch.zeros_like(completion_mask)
        keep[:, :2] = True
        return keep


def test_hook_mask_zeroes_the_gradient_at_masked_positions():
    logits, ids, _, _ = case(4)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.0]), G, "group")

    def grads(kernel):
        mask = rl_loss_mask(kernel, ids, MASK, tokenizer=None)
        x = logits.clone().requires_grad_(True)
        loss, _ = grpo_loss(logps_of(x, ids), None, None, adv, mask, epsilon=EPS, epsilon_high=None, beta=0.0,
                            loss_type="dapo", max_completion_length=MAX_LEN)
        loss.backward()
        return mask, x.grad

    plain = Kernel({"plugins": []})
    mask_plain, g_plain = grads(plain)
    assert torch.equal(mask_plain, MASK)
    hooked = Kernel({"plugins": []})
    hooked.register(KeepFirstTwo(), name="keep2")
    mask, g = grads(hooked)
    assert torch.equal(mask, MASK & (torch.arange(T) < 2))
    assert g[:, 2:].abs().max() == 0  # exactly zero where the hook masked
    assert (g[mask].abs().sum(-1) > 0).all()  # and alive where it did not
    assert (g_plain[:, 2:][MASK[:, 2:]].abs().sum(-1) > 0).all()  # without the hook those positions learn


def test_truncated_completions_are_masked_when_asked():
    truncated = torch.tensor([False, True, False, False, True, False])
    mask = rl_loss_mask(Kernel({"plugins": []}), torch.zeros(N, T, dtype=torch.long), MASK, None, truncated)
    assert not mask[1].any() and not mask[4].any() and torch.equal(mask[0], MASK[0])
