"""The GRPO loop calls ``metareason_extra_losses`` like the SFT loop: a plugin's term reaches the
loss and the gradient, is logged as ``train/<name>``, sees the RL batch (completion ids, loss mask)
and the policy's log-probs with their gradient; weight 0 equals the plain loss exactly."""
import json

import torch

from metareason import hookimpl
from tests.test_grpo import kernel, tiny


class Term:
    """Adds ``weight * mean logp of the completion tokens`` and records what the hook saw."""

    def __init__(self, weight):
        self.weight, self.seen = weight, []

    @hookimpl
    def metareason_extra_losses(self, batch, outputs, step):
        logps = outputs.logps
        self.seen.append({"rl": batch.get("rl"), "logps_shape": tuple(logps.shape),
                          "ids_shape": tuple(batch["completion_ids"].shape),
                          "mask_shape": tuple(batch["loss_mask"].shape), "grad": logps.requires_grad,
                          "logits": outputs.logits, "step": step})
        mask = batch["loss_mask"].float()
        term = (logps * mask).sum() / mask.sum().clamp(min=1)
        self.seen[-1]["value"] = float(term.detach())
        return {"logp_bonus": (self.weight, term)}


def _run(tmp_path, name, *plugins, grad_accum=2):
    k = kernel(tiny(tmp_path, name, rl={"rewards": {"frac_digits": 1.0}}, max_steps=1, seed=3,
                    grad_accum=grad_accum, max_grad_norm=None), *plugins)
    k.run()
    rows = [json.loads(l) for l in (k.config.run_dir / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    from metareason.checkpoint import latest_checkpoint

    weights = load_file(str(latest_checkpoint(k.config.run_dir) / "model.safetensors"))
    return rows[0], weights


def test_extra_term_reaches_the_rl_gradient_is_logged_and_weight_zero_is_the_plain_loss(tmp_path):
    plain, w_plain = _run(tmp_path, "plain")
    zero_plugin = Term(0.0)
    zero, w_zero = _run(tmp_path, "zero", zero_plugin)
    term_plugin = Term(5.0)
    term, w_term = _run(tmp_path, "term", term_plugin)

    assert plain["rl/reward/mean"] == zero["rl/reward/mean"] == term["rl/reward/mean"]  # the same rollout
    assert "train/logp_bonus" not in plain and "train/logp_bonus" in term and "train/logp_bonus" in zero
    assert term["train/logp_bonus"] < 0  # a mean log-prob
    assert zero["train/loss"] == plain["train/loss"]
    assert all(torch.equal(w_plain[k], w_zero[k]) for k in w_plain)
    assert term["train/loss"] != plain["train/loss"]
    assert any(not torch.equal(w_plain[k], w_term[k]) for k in w_plain)

    seen = term_plugin.seen
    assert len(seen) == 2  # one call per micro-batch
    for s in seen:
        assert s["rl"] is True and s["grad"] and s["logits"] is None and s["step"] == 0
        assert s["logps_shape"] == s["ids_shape"] == s["mask_shape"]
    # logged: the micro-batch mean of the unweighted term; in the loss: weight * term / grad_accum
    values = [s["value"] for s in seen]
    assert abs(term["train/logp_bonus"] - sum(values) / 2) < 1e-6
    assert abs((term["train/loss"] - plain["train/loss"]) - 5.0 * sum(values) / 2) < 1e-4
