"""The public API for plugins: everything a plugin may import from ``metareason``.

A plugin imports from the kernel only through this module (``from metareason.api import ...``)
and from its own package; never from another plugin. An import contract checked in CI
(``.importlinter``, ``make lint-imports``) holds the built-in plugins to this. Names not listed
in ``__all__`` are internal and may change without notice; the hooks themselves are documented in
:mod:`metareason.hookspecs` (read it first). ``docs/writing-a-plugin.md`` builds a plugin with it.

Names load lazily (PEP 562): importing this module imports no torch, so a plugin's hook module
may import it at the top while the kernel discovers plugins.

Plugin basics
    ``hookimpl`` (the marker of hook implementations), ``Kernel`` (the run: ``kernel.config``,
    ``kernel.source``, ``kernel.raw_config``, ``kernel.load()``, ``kernel.generator(name)``,
    ``kernel.call_each(hook, **kwargs)``, ``kernel.chain(...)``, ``kernel.evaluate()``, ...),
    ``loading_entry_points()`` (true while the kernel imports plugins: skip heavy work then).
Errors
    ``UserError`` (bad input: the CLI prints one line, exit 2), ``ConfigError`` (a config field:
    ``file: field.path: message``), ``PluginError``, ``TaskError`` (a task's parameters).
Config and source
    ``Section`` (base of a plugin's config section: unknown keys are errors), ``ModelConfig``,
    ``load_config``, ``read_yaml``, ``apply_overrides`` (dotted ``a.b=value`` overrides),
    ``dump_config``, ``config_source(config)`` (what errors name: the file, or ``config``).
Data and tokenisation
    ``Task`` (indexable examples + ``score``), ``ListTask`` (a task from a list of example dicts
    and a scorer), ``load_records`` (JSONL rows with line numbers),
    ``extract_answer`` / ``answers_match`` (the final answer of a completion, compared with a
    gold one), ``make_causal_loop_task`` / ``parse_causal_loop_answer`` (the built-in synthetic
    task), ``PLAIN_CHAT`` (no chat template), ``SpecialToken`` (a token a plugin adds to the
    vocabulary; ``trainable=True``: its rows are trained under LoRA too), ``token_row_targets``
    (peft's ``{module: ids}`` for trainable token rows), ``prompt_ids``, ``collate``,
    ``IGNORE_INDEX`` (the label of a token outside the loss), ``encode_sft_examples`` (a run's SFT encoding of examples), ``TaskParams`` /
    ``parse_params`` (a task's parameters as a pydantic model, with the config's one-line errors),
    ``FieldName`` (a parameter naming a record field).
Loss
    ``token_loss(logits, labels)`` (summed next-token cross-entropy and the token count).
Models and generation
    ``load_tokenizer``, ``build_model``, ``resolve_device``, ``CACHE_KWARG`` /
    ``cache_from_kwargs`` (the KV-cache keyword across transformers releases), ``generate``
    (the kernel's batched sampling), ``LocalGenerator`` (a run or model dir as a generator;
    named generators come from ``kernel.generator(name)``).
Runs, checkpoints, evaluation
    ``checkpoints_dir``, ``latest_checkpoint``, ``load_weights_into``, ``load_trained`` (a run
    dir's kernel, model and tokenizer at a checkpoint), ``export_run``, ``evaluate``,
    ``evaluate_target``, ``build_eval_examples``, ``read_metrics`` (a run's ``metrics.jsonl``),
    ``progress`` (a progress bar that honours ``quiet``).
Records, reports, statistics
    ``write_record(out, record, markdown)`` (a JSON + markdown result pair), ``cpu_name()``,
    ``relative_path(path)`` (a path for a committed record: relative to the working directory),
    ``mcnemar_exact(b, c)``, ``__version__``.
Durable files (whole or not at all, fsynced)
    ``write_text_atomic``, ``write_bytes_atomic``, ``write_json_atomic``, ``write_jsonl_atomic``,
    ``atomic_file`` (a temp path to write, then replaced), ``atomic_dir`` (a temp directory renamed
    into place), ``append_jsonl`` (one fsynced line per call; a torn last line is cut).
Scale
    ``connect_ray`` (connect to or start a Ray runtime), ``run_trials`` (Ray Tune trials).
Compiled ops
    ``lru_act``, ``LRUParams``, ``lru_act_compute_dtype``, ``mla_decode``, ``MLA_DECODE_BLOCK``.

A run's report: a plugin writes markdown into ``RUN_DIR/report_sections/*.md`` (``report.md``
appends them in name order) and returns eval metrics from ``metareason_on_eval_samples``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> "module:attribute"
_NAMES: dict[str, str] = {
    # plugin basics
    "hookimpl": "metareason.hookspecs:hookimpl",
    "Kernel": "metareason.kernel:Kernel",
    "loading_entry_points": "metareason.plugin_manager:loading_entry_points",
    # errors
    "UserError": "metareason.errors:UserError",
    "ConfigError": "metareason.config:ConfigError",
    "PluginError": "metareason.plugin_manager:PluginError",
    "TaskError": "metareason.data.base:TaskError",
    # config and source
    "Section": "metareason.config:Section",
    "ModelConfig": "metareason.config:ModelConfig",
    "load_config": "metareason.config:load_config",
    "read_yaml": "metareason.config:read_yaml",
    "apply_overrides": "metareason.config:apply_overrides",
    "dump_config": "metareason.config:dump_config",
    "config_source": "metareason.config:config_source",
    # data and tokenisation
    "Task": "metareason.data.base:Task",
    "ListTask": "metareason.data.base:ListTask",
    "load_records": "metareason.data.jsonl_task:load_records",
    "extract_answer": "metareason.data.jsonl_task:extract_answer",
    "answers_match": "metareason.data.jsonl_task:answers_match",
    "make_causal_loop_task": "metareason.data.causal_loop:make_task",
    "parse_causal_loop_answer": "metareason.data.causal_loop:parse_answer",
    "PLAIN_CHAT": "metareason.data.chat:PLAIN",
    "SpecialToken": "metareason.models:SpecialToken",
    "token_row_targets": "metareason.models.special_tokens:token_row_targets",
    "prompt_ids": "metareason.data.tokenize:prompt_ids",
    "collate": "metareason.data.tokenize:collate",
    "IGNORE_INDEX": "metareason.data.tokenize:IGNORE_INDEX",
    "encode_sft_examples": "metareason.train.sft:encode_sft_examples",
    "TaskParams": "metareason.data.base:TaskParams",
    "parse_params": "metareason.data.base:parse_params",
    "FieldName": "metareason.data.jsonl_task:FieldName",
    # loss
    "token_loss": "metareason.train.sft:token_loss",
    # models and generation
    "load_tokenizer": "metareason.models.loader:load_tokenizer",
    "build_model": "metareason.models.loader:build_model",
    "resolve_device": "metareason.models.loader:resolve_device",
    "CACHE_KWARG": "metareason.models.compat:CACHE_KWARG",
    "cache_from_kwargs": "metareason.models.compat:cache_from_kwargs",
    "generate": "metareason.generation.generate:generate",
    "LocalGenerator": "metareason.generators.local:LocalGenerator",
    # runs, checkpoints, evaluation
    "checkpoints_dir": "metareason.checkpoint:checkpoints_dir",
    "latest_checkpoint": "metareason.checkpoint:latest_checkpoint",
    "load_weights_into": "metareason.checkpoint:load_weights_into",
    "load_trained": "metareason.trained:load_trained",
    "export_run": "metareason.model_export:export_run",
    "evaluate": "metareason.evaluate:evaluate",
    "evaluate_target": "metareason.eval_command:evaluate_target",
    "build_eval_examples": "metareason.evaluate:build_eval_examples",
    "read_metrics": "metareason.metrics:read_metrics",
    "progress": "metareason.metrics:progress",
    # records, reports, statistics
    "write_record": "metareason.benchmarks:write_record",
    "cpu_name": "metareason.benchmarks:cpu_name",
    "relative_path": "metareason.benchmarks:relative_path",
    "mcnemar_exact": "metareason.stats:mcnemar_exact",
    # durable files (written whole or not at all)
    "write_text_atomic": "metareason.durable:write_text_atomic",
    "write_bytes_atomic": "metareason.durable:write_bytes_atomic",
    "write_json_atomic": "metareason.durable:write_json_atomic",
    "write_jsonl_atomic": "metareason.durable:write_jsonl_atomic",
    "atomic_file": "metareason.durable:atomic_file",
    "atomic_dir": "metareason.durable:atomic_dir",
    "append_jsonl": "metareason.durable:append_jsonl",
    "__version__": "metareason.version:__version__",
    # scale
    "connect_ray": "metareason.scale.runtime:connect",
    "run_trials": "metareason.scale.tune:run_trials",
    # compiled ops
    "lru_act": "metareason.ops.lru_act:lru_act",
    "LRUParams": "metareason.ops.lru_act:LRUParams",
    "lru_act_compute_dtype": "metareason.ops.lru_act.reference:compute_dtype",
    "mla_decode": "metareason.ops:mla_decode",
    "MLA_DECODE_BLOCK": "metareason.ops.mla_decode.reference:BLOCK",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    target = _NAMES.get(name)
    if target is None:
        raise AttributeError(f"module 'metareason.api' has no attribute {name!r} (the public API is "
                             f"metareason.api.__all__)")
    module, attr = target.split(":")
    # looked up on every access, not cached here: the defining module stays the one source (what a
    # test patches there, a plugin sees)
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see; the same objects as the table above
    from metareason.benchmarks import cpu_name, relative_path, write_record
    from metareason.checkpoint import checkpoints_dir, latest_checkpoint, load_weights_into
    from metareason.config import (ConfigError, ModelConfig, Section, apply_overrides, config_source, dump_config,
                                   load_config, read_yaml)
    from metareason.data.base import ListTask, Task, TaskError, TaskParams, parse_params
    from metareason.data.causal_loop import make_task as make_causal_loop_task
    from metareason.data.causal_loop import parse_answer as parse_causal_loop_answer
    from metareason.data.chat import PLAIN as PLAIN_CHAT
    from metareason.data.jsonl_task import FieldName, answers_match, extract_answer, load_records
    from metareason.data.tokenize import IGNORE_INDEX, collate, prompt_ids
    from metareason.durable import (append_jsonl, atomic_dir, atomic_file, write_bytes_atomic, write_json_atomic,
                                    write_jsonl_atomic, write_text_atomic)
    from metareason.errors import UserError
    from metareason.eval_command import evaluate_target
    from metareason.evaluate import build_eval_examples, evaluate
    from metareason.generation.generate import generate
    from metareason.generators.local import LocalGenerator
    from metareason.hookspecs import hookimpl
    from metareason.kernel import Kernel
    from metareason.metrics import progress, read_metrics
    from metareason.model_export import export_run
    from metareason.models import SpecialToken
    from metareason.models.special_tokens import token_row_targets
    from metareason.models.compat import CACHE_KWARG, cache_from_kwargs
    from metareason.models.loader import build_model, load_tokenizer, resolve_device
    from metareason.ops import mla_decode
    from metareason.ops.lru_act import LRUParams, lru_act
    from metareason.ops.lru_act.reference import compute_dtype as lru_act_compute_dtype
    from metareason.ops.mla_decode.reference import BLOCK as MLA_DECODE_BLOCK
    from metareason.plugin_manager import PluginError, loading_entry_points
    from metareason.scale.runtime import connect as connect_ray
    from metareason.scale.tune import run_trials
    from metareason.stats import mcnemar_exact
    from metareason.train.sft import encode_sft_examples, token_loss
    from metareason.trained import load_trained
    from metareason.version import __version__
