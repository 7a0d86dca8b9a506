"""Hook implementations of the lru plugin (ZeroModel: MLA + Latent Reasoning Unit).

* ``metareason_register_models``: the ``deepseek_mla`` architecture.
* ``metareason_config_sections``: the ``lru`` section (loss weights, sweep labels).
* ``metareason_extra_losses``: ``L_pred``, ``L_stability``, ``L_sparsity``, ``L_ponder`` — only
  for forward outputs that carry ``lru_stats`` (i.e. ``deepseek_mla`` models); no-op otherwise.
* ``metareason_cli_commands``: ``metareason lru sweep DIR``, ``metareason lru stats RUN_DIR`` and
  ``metareason lru bench-decode CONFIG_DIR``.

Heavy imports (torch, transformers) happen inside the hooks, so loading the plugin is cheap.
"""
from __future__ import annotations

from metareason.api import hookimpl


@hookimpl
def metareason_register_models(register):
    from metareason.plugins.lru.config import MODEL_TYPE, DeepSeekMLAConfig
    from metareason.plugins.lru.modeling import DeepSeekMLAForCausalLM

    register(MODEL_TYPE, DeepSeekMLAConfig, DeepSeekMLAForCausalLM)


@hookimpl
def metareason_config_sections():
    from metareason.plugins.lru.section import LRUSection

    return {"lru": LRUSection}


@hookimpl
def metareason_extra_losses(model, batch, outputs, config, step):
    stats = getattr(outputs, "lru_stats", None)
    if stats is None:
        return None  # not a deepseek_mla model
    from metareason.plugins.lru.losses import lru_loss_terms
    from metareason.api import token_loss

    weights = config.lru.loss_weights
    mask = batch.get("attention_mask")
    terms = {}
    # The kernel adds the token loss (L_pred) with weight 1; this adds (w - 1)·L_pred so its total
    # weight is loss_weights.pred, and logs it under its own name.
    labels = batch["labels"].to(outputs.logits.device)
    if weights.pred == 1.0:
        terms["L_pred"] = (0.0, token_loss(outputs.logits.detach(), labels)[0])
    else:
        terms["L_pred"] = (weights.pred - 1.0, token_loss(outputs.logits, labels)[0])
    for name, value in lru_loss_terms(stats, mask).items():
        terms[f"L_{name}"] = (getattr(weights, name), value)
    return terms


@hookimpl
def metareason_cli_commands(subparsers):
    from metareason.plugins.lru.cli import add_commands

    add_commands(subparsers)
