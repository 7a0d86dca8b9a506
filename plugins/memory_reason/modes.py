"""Training modes: ``full | lora | prompt-tuning | lora+prompt-tuning``.

Prompt-tuning trains only the rows of the added tokens, input and output. The rows live in a
small separate parameter (peft ``TrainableTokens``: the layer writes them over the frozen matrix
in its forward), so AdamW's decoupled weight decay, which touches every element of a parameter
that requires grad, cannot reach any other row; with tied embeddings the output layer uses the
same new rows. The checkpoint of a PEFT model is its adapter (LoRA weights and the new rows).
"""
from __future__ import annotations

from types import SimpleNamespace

from metareason.api import ConfigError, token_row_targets as token_targets


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def prepare(model, config, token_ids: list[int]):
    """The model for ``memory_reason.mode``; ``None`` keeps it as it is."""
    mode = config.memory_reason.mode
    lora = config.model.lora.enabled
    if mode == "full":
        if lora:
            raise ConfigError("memory_reason.mode: full trains every weight; set model.lora.enabled: false "
                              "(or mode: lora / lora+prompt-tuning)")
        return None
    if mode in ("lora", "lora+prompt-tuning") and not (lora and _is_peft(model)):
        raise ConfigError(f"memory_reason.mode: {mode} needs model.lora.enabled: true (set model.lora.target_modules, "
                          "e.g. [gate_proj, up_proj, down_proj] for the MLP as in the paper)")
    if mode == "lora":
        return None
    if not token_ids:
        raise ConfigError(f"memory_reason.mode: {mode} tunes the rows of the step tokens, but none were added")
    if mode == "prompt-tuning":
        if lora:
            raise ConfigError("memory_reason.mode: prompt-tuning trains only the new rows; set model.lora.enabled: "
                              "false (or mode: lora+prompt-tuning)")
        from peft import TrainableTokensConfig, get_peft_model

        targets = token_targets(model, token_ids)
        return get_peft_model(model, TrainableTokensConfig(token_indices=list(token_ids), target_modules=list(targets)))
    return add_trainable_tokens(model, token_ids)


def add_trainable_tokens(peft_model, token_ids: list[int]):
    """Add trainable rows of ``token_ids`` to the active LoRA adapter of ``peft_model`` (what
    ``LoraConfig(trainable_token_indices=...)`` does when the kernel built the adapter)."""
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import set_additional_trainable_modules

    name = peft_model.active_adapter
    cfg = peft_model.peft_config[name]
    trained = cfg.trainable_token_indices or {}
    have = set().union(*trained.values()) if isinstance(trained, dict) else set(trained)
    if set(token_ids) <= have:  # the kernel built the adapter with these rows (SpecialToken(trainable=True))
        return peft_model
    if have:
        raise ConfigError(f"memory_reason.mode: lora+prompt-tuning: the LoRA adapter already trains token rows "
                          f"{sorted(have)}, not {sorted(set(token_ids) - have)}; peft cannot add rows to it")
    targets = token_targets(peft_model, token_ids)
    cfg.trainable_token_indices = targets  # saved in adapter_config.json; the state dict holds the rows
    only_tokens = SimpleNamespace(modules_to_save=None, modules_to_tie=None, trainable_token_indices=targets,
                                  inference_mode=False, ensure_weight_tying=False)
    set_additional_trainable_modules(model=peft_model.base_model.model, peft_config=only_tokens,
                                     model_config=BaseTuner.get_model_config(peft_model.base_model),
                                     adapter_name=name)
    return peft_model


def trainable_parameters(model) -> int:
    """Trainable elements, a tied parameter counted once."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
