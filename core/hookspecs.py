"""Every hook a metareason plugin can implement. The one file a plugin author must read.

A plugin is any object or module with functions decorated by ``@hookimpl`` whose names match
the specs below; it is found through the entry-point group ``metareason``::

    # pyproject.toml of a plugin package
    [project.entry-points.metareason]
    my_method = "my_package.plugin"

or registered programmatically with ``Kernel(config).register(obj)``. An implementation may
accept any subset of a hook's arguments (pluggy passes only the names it asks for). A plugin
imports from the kernel only ``metareason.api`` (``hookimpl`` included; docs/writing-a-plugin.md).

Conventions
-----------
* Registry hooks (``metareason_register_*``) receive a ``register`` callback; call it once per
  thing you provide. Names must be unique across plugins: a clash is an error naming both.
* "Chained" hooks (prompt transform, SFT labels, model preparation) run one plugin after the
  other; each receives what the previous one returned (return ``None`` to keep it unchanged).
* Masks returned by ``metareason_rl_loss_mask`` are AND-ed with the kernel's own mask.
* Metrics returned by ``metareason_on_eval_samples`` join the evaluation's metrics and report.
* ``kernel.call_each(hook_name, **kwargs)`` calls every implementation of a hook and returns
  ``(plugin name, result)`` pairs (``None`` results included), in pluggy's call order.
* An exception raised inside a hook is re-raised as ``metareason.plugin_manager.PluginError`` naming
  the plugin and the hook.
* Spec arguments have no default values: pluggy before 1.6 leaves an argument with a default out
  of the spec, and an implementation asking for it is then refused (tests/test_plugins.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import torch
    from pydantic import BaseModel

    from metareason.config import RunConfig
    from metareason.kernel import Kernel

PROJECT = "metareason"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_register_tasks(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Provide tasks (datasets with a scorer).

    Called once when the kernel builds its task registry. ``register(name, factory)`` where
    ``factory(params: dict, seed: int, num_samples: int) -> metareason.data.Task``. A name
    ending in ``/`` registers a family: ``reasoning_gym/`` serves ``reasoning_gym/<anything>``
    and the factory receives the suffix as ``params["name"]``.
    """


@hookspec
def metareason_register_rewards(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Provide reward functions for RL and scoring.

    ``register(name, fn)`` where ``fn(completions: list[str], examples: list[dict], **extras) ->
    list[float]`` (``None`` for "no opinion"). A function gets the extras it names among
    ``completion_ids``, ``completion_lengths``, ``truncated``, ``tokenizer``, ``prompts`` (the
    rendered prompt texts), ``tasks`` (each example's task object) and ``config`` (the run
    config). Rewards are selected and weighted in the run config by name (``rl.rewards``).
    Built-in: ``task_score`` (the task's own scorer), ``format`` (``rl.format_pattern``),
    ``causal_loop_exact``.
    """


@hookspec
def metareason_register_models(register: Callable[[str, type, type], None]) -> None:
    """Provide model architectures.

    ``register(model_type, config_class, model_class)``: the kernel registers the pair with
    transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, so ``model.arch.model_type`` in a
    run config, ``save_pretrained`` and ``from_pretrained`` work for it like for a built-in.
    """


@hookspec
def metareason_register_generator_backends(register: Callable[[str, type, Callable[..., Any]], None]) -> None:
    """Provide generator backend types (what a ``generators:`` entry's ``type`` names).

    ``register(type_name, ConfigModel, factory)``: ``ConfigModel`` is a pydantic model of the
    entry's fields (it must accept ``type``); ``factory(config, name) -> metareason.generators.Generator``
    is called when a plugin asks ``kernel.generator(name)``. Built-in: ``local``, ``openai``, ``python``.
    """


@hookspec
def metareason_config_sections() -> dict[str, type["BaseModel"]]:
    """Contribute top-level config sections: ``{"section_name": PydanticModel}``.

    The section is validated with the rest of the run config (unknown fields and wrong types
    are errors naming the field path) and is available as ``config.section_name``. Sections
    should have defaults for every field so that a config may omit them.
    """


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_special_tokens(config: "RunConfig") -> Optional[list[Any]]:
    """Return special tokens this plugin needs in the vocabulary.

    Items are strings or ``metareason.models.SpecialToken(text, init_from=[words])``. The kernel
    adds them to the tokenizer, resizes the embeddings, and initialises each new row from the
    mean of the embeddings of ``init_from`` (or of the whole vocabulary when not given), never
    from random noise.
    """


@hookspec
def metareason_prepare_model(model: "torch.nn.Module", tokenizer: Any, config: "RunConfig",
                             new_token_ids: list[int]) -> Optional["torch.nn.Module"]:
    """Change the model after loading, resizing and (when configured) PEFT wrapping.

    Chained: freeze parameters, add trainable rows only, wrap it. Return a replacement model or
    ``None``. ``new_token_ids`` are the ids of the special tokens added for this run.
    """


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_transform_prompt(prompt: str, example: dict, config: "RunConfig") -> Optional[str]:
    """Rewrite a prompt before tokenisation (training) and before generation (eval/inference).

    Chained; return the new prompt or ``None`` to keep it.
    """


@hookspec
def metareason_transform_example(example: dict, config: "RunConfig", split: str) -> Optional[dict]:
    """Rewrite a data example when a task's examples are loaded, before any prompt transform.

    ``split`` is ``"train"`` (the SFT / RL training data) or ``"eval"``. The example is a copy
    of the task's dict (``prompt``, ``completion``, ``answer``, task fields); return a new dict
    (e.g. with the completion re-formatted) or ``None`` to keep it. Chained.
    """


@hookspec
def metareason_sft_labels(labels: "torch.Tensor", batch: dict, tokenizer: Any,
                          config: "RunConfig") -> Optional["torch.Tensor"]:
    """Change the labels of an SFT batch (``-100`` = not in the loss).

    ``labels`` ``[B, T]`` are the current labels (prompt and padding already -100, and any
    change by an earlier plugin applied). ``batch`` has ``input_ids``, ``attention_mask``,
    ``prompt_lengths``, ``examples`` (the source dicts) and ``epoch`` (int, the data epoch of
    the batch: seed random masking by example and epoch to make it reproducible). Chained;
    return new labels or ``None``. Called every micro-batch, so random masking is re-drawn
    each time.
    """


@hookspec
def metareason_rl_loss_mask(completion_ids: "torch.Tensor", completion_mask: "torch.Tensor",
                            tokenizer: Any, config: "RunConfig") -> Optional["torch.Tensor"]:
    """Restrict the RL token loss mask (``[B, T]`` bool) of sampled completions.

    Every returned mask is AND-ed with the kernel's mask (padding, truncation).
    """


# ---------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_extra_losses(model: "torch.nn.Module", batch: dict, outputs: Any, config: "RunConfig",
                            step: int) -> Optional[dict[str, Any]]:
    """Add named loss terms to the training step.

    Return ``{name: tensor}`` (weight 1) or ``{name: (weight, tensor)}``; the kernel adds
    ``weight * tensor`` to the loss and logs each unweighted term as ``train/<name>``.

    SFT loop (every micro-batch): ``batch`` is the SFT batch (``input_ids``, ``attention_mask``,
    ``labels`` after ``metareason_sft_labels``, ``prompt_lengths``, ``examples``, ``epoch``) and
    ``outputs`` the model's forward output (logits, and whatever the model attached).

    RL loop (every micro-batch of every optimizer step): ``batch`` has ``rl: True``,
    ``input_ids`` / ``attention_mask`` ``[B, P + W]`` (left-padded prompt + sampled completion),
    ``completion_ids`` ``[B, W]`` (the last ``W = width`` columns), ``loss_mask`` ``[B, W]``,
    ``advantages`` ``[B]``, ``width``, ``old_logps`` / ``ref_logps`` (or ``None``); ``outputs``
    has ``logps`` ``[B, W]``: the current policy's log-probs of the completion tokens (with
    gradient, temperature-scaled) and ``logits = None`` (the loop keeps no full logits). The
    term is added as ``weight * tensor / grad_accum`` to the micro-batch's policy loss.
    """


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_generation_triggers(config: "RunConfig") -> Optional[list[str]]:
    """Strings that, when they appear in a completion, trigger ``metareason_generation_handover``."""


@hookspec(firstresult=True)
def metareason_generation_handover(state: Any) -> Optional[str]:
    """Take over generation at a trigger.

    ``state`` is a ``metareason.generation.generate.HandoverState`` (prompt, text so far, the trigger that
    fired, the example). Return text to append to the completion (the model then resumes after
    it), or ``None`` to let the model continue. The first plugin to return text wins.
    """


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_on_run_start(kernel: "Kernel", run_dir: str) -> None:
    """A run is starting; ``run_dir`` exists and holds the resolved config."""


@hookspec
def metareason_on_step_end(kernel: "Kernel", step: int, metrics: dict) -> None:
    """An optimizer step finished. ``metrics`` may be extended in place before it is logged."""


@hookspec
def metareason_on_eval(kernel: "Kernel", step: int, metrics: dict) -> None:
    """An evaluation finished; ``metrics`` holds ``eval/...`` keys and may be extended."""


@hookspec
def metareason_on_eval_samples(kernel: "Kernel", step: int, samples: list[dict], model: Any,
                               tokenizer: Any) -> Optional[dict[str, float]]:
    """The scored generations of an evaluation, before ``metareason_on_eval``.

    ``model`` and ``tokenizer`` are the ones that generated them (e.g. to inspect attention).

    One dict per eval example: ``id``, ``group``, ``prompt`` (after every prompt transform),
    ``completion``, ``answer``, ``score``, ``gen_tokens`` and ``example`` (the source dict).
    Lets a plugin see what the model wrote per example (e.g. count what a completion refers
    to, split by correctness); treat the dicts as read-only.

    Return ``None`` or ``{name: number}``: metrics of these samples. They join the evaluation's
    metrics (what ``evaluate`` returns, ``metrics.jsonl``, the ``metrics`` that
    ``metareason_on_eval`` sees, the run's ``report.md``) under ``name`` when it starts with
    ``eval/``, else under ``eval/<name>``; use your plugin's name in it (``eval/myplugin/...``).
    A name the kernel or another plugin already set is an error, so is a value that is no number.
    Keep per-run state here, not in module globals.
    """


@hookspec
def metareason_on_checkpoint(kernel: "Kernel", step: int, path: str) -> None:
    """A checkpoint was written (atomically) to ``path``."""


@hookspec
def metareason_on_run_end(kernel: "Kernel", metrics: dict) -> None:
    """The run finished; ``metrics`` is the last evaluation."""


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
@hookspec
def metareason_cli_commands(subparsers: "argparse._SubParsersAction") -> None:
    """Add subcommands to the ``metareason`` CLI.

    Call ``subparsers.add_parser(name, help=...)`` and ``parser.set_defaults(func=fn)``;
    ``fn(args) -> int`` is the exit code. Use a plugin-named group (``metareason cspo ...``).
    """
