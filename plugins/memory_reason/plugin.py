"""Hook implementations of the memory_reason plugin (disentangling memory and reasoning).

Registered always: the ``memory_reason`` config section, the tasks ``memory_world`` and
``memory_reason_jsonl``, and ``metareason memory_reason ...``. Active only with
``memory_reason.enabled: true``: the step-type tokens, the data conversion (typed steps ->
``<prefix..><type..> text`` lines, prefix tokens after the prompt), the training mode, and the
evaluation analysis (step counts, error attribution, attention heatmap in the report).
"""
from __future__ import annotations

from metareason.api import hookimpl


def _section(config):
    mr = getattr(config, "memory_reason", None)
    return mr if mr is not None and mr.enabled else None


def _vocabulary(section):
    from metareason.plugins.memory_reason.tokens import vocabulary

    return vocabulary(section)


@hookimpl
def metareason_config_sections():
    from metareason.plugins.memory_reason.config import MemoryReasonSection

    return {"memory_reason": MemoryReasonSection}


@hookimpl
def metareason_register_tasks(register):
    from metareason.plugins.memory_reason.tasks import make_jsonl_task, make_world_task

    register("memory_world", make_world_task)
    register("memory_reason_jsonl", make_jsonl_task)


@hookimpl
def metareason_special_tokens(config):
    mr = _section(config)
    if mr is None or not mr.step_tokens:
        return None
    from metareason.api import SpecialToken
    from metareason.plugins.memory_reason.tokens import special_tokens

    # lora+prompt-tuning trains the rows of every token added for the run: the config's own too
    extra = [SpecialToken(t, trainable=True) for t in config.model.special_tokens] \
        if mr.mode == "lora+prompt-tuning" else []
    return special_tokens(mr) + extra


@hookimpl
def metareason_transform_example(example, config, split):
    """Typed steps (``cot_steps``, or ``[memory]:`` / ``[rag]:`` / ``[reason]:`` markers in the
    completion) become the completion in the configured format."""
    mr = _section(config)
    if mr is None:
        return None
    from metareason.plugins.memory_reason.steps import has_markers, normalise_steps, parse_markers, render

    where = f"example {example.get('id', '?')}"
    if example.get("cot_steps"):
        steps = normalise_steps(example["cot_steps"], where, mr.memory_name)
    elif has_markers(example.get("completion", "")):
        steps = parse_markers(example["completion"], f"{where}: completion")
    else:
        return None
    out = dict(example, cot_steps=steps)
    out["completion"] = render(steps, str(example["answer"]), _vocabulary(mr), mr.step_tokens, mr.answer_prefix,
                               mr.first_prefix)
    return out


@hookimpl
def metareason_transform_prompt(prompt, example, config):
    """The prefix tokens follow the prompt (training and generation): the model writes the first
    step's type tokens itself."""
    mr = _section(config)
    if mr is None or not mr.step_tokens or not mr.n_prefix or mr.first_prefix == "completion":
        return None
    return prompt + _vocabulary(mr).prefix


@hookimpl
def metareason_prepare_model(model, tokenizer, config, new_token_ids):
    mr = _section(config)
    if mr is None:
        return None
    from metareason.plugins.memory_reason.modes import prepare

    ids = set(new_token_ids or [])
    if mr.step_tokens:
        vocab = tokenizer.get_vocab()
        ids |= {vocab[t] for t in _vocabulary(mr).all_tokens if t in vocab}
    return prepare(model, config, sorted(ids))


@hookimpl
def metareason_on_eval_samples(kernel, step, samples, model, tokenizer):
    mr = _section(kernel.config)
    if mr is None:
        return None
    from metareason.plugins.memory_reason.analysis import analyse, metric_names
    from metareason.plugins.memory_reason.report import write_section

    voc = _vocabulary(mr)
    stats = analyse(samples, voc, mr.answer_prefix)
    shares = None
    if model is not None and mr.attention_samples:
        from metareason.plugins.memory_reason.attention import attention_shares

        shares = attention_shares(model, tokenizer, samples[: mr.attention_samples], voc, mr.answer_prefix)
        if shares is not None:
            stats["attn_memory"] = float(shares[:, 1].mean())
            stats["attn_reason"] = float(shares[:, 2].mean())
    write_section(kernel.config.run_dir, step, stats, shares)
    return metric_names(stats)  # eval/memory_reason/<name>: into the eval metrics and the report


@hookimpl
def metareason_cli_commands(subparsers):
    from metareason.plugins.memory_reason.cli import add_commands

    add_commands(subparsers)
