"""The kernel's own plugin: built-in tasks, rewards and generator backends.

Registered through the same entry-point group as every other plugin (see ``setup.py``), so
third-party plugins see no difference between what ships with the kernel and what they add.
Task modules are imported lazily by their factories.
"""
from __future__ import annotations

from metareason.hookspecs import hookimpl


def _causal_loop(params, seed, num_samples):
    from metareason.data.causal_loop import make_task

    return make_task(params, seed, num_samples)


def _jsonl(params, seed, num_samples):
    from metareason.data.jsonl_task import make_task

    return make_task(params, seed, num_samples)


def _reasoning_gym(params, seed, num_samples):
    from metareason.data.reasoning_gym_task import make_task

    return make_task(params, seed, num_samples)


@hookimpl
def metareason_register_tasks(register):
    register("causal_loop", _causal_loop)
    register("jsonl", _jsonl)
    register("reasoning_gym/", _reasoning_gym)


def _causal_loop_exact(completions, examples):
    from metareason.data.causal_loop import reward_exact_match

    return reward_exact_match(completions, examples)


def _task_score(completions, examples, tasks):
    """Each completion scored by its own task's scorer (reasoning-gym's ``score_answer``, the
    jsonl task's answer match, ...): the same number ``eval`` reports."""
    if any(t is None for t in tasks):
        raise ValueError("task_score: an example has no task (only data.train examples can be scored)")
    return [float(t.score(c, e)) for c, e, t in zip(completions, examples, tasks)]


def _format(completions, examples, config):
    """1.0 when the whole (stripped) completion matches ``rl.format_pattern`` (``re.DOTALL``)."""
    import re

    pattern = config.rl.format_pattern
    if pattern is None:
        raise ValueError("rl.format_pattern: the format reward needs a regular expression, "
                         "e.g. '(?s).*answer: \\S+'")
    rx = re.compile(pattern, re.DOTALL)
    return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]


@hookimpl
def metareason_register_rewards(register):
    register("causal_loop_exact", _causal_loop_exact)
    register("task_score", _task_score)
    register("format", _format)


def _generator_backend(module: str, config_cls: str, generator_cls: str):
    """(ConfigModel, factory) of a built-in backend, importing its module only when used."""
    import importlib

    mod = importlib.import_module(f"metareason.generators.{module}")
    cls = getattr(mod, generator_cls)
    return getattr(mod, config_cls), lambda cfg, name: cls.from_config(cfg, name)


@hookimpl
def metareason_register_generator_backends(register):
    register("local", *_generator_backend("local", "LocalGeneratorConfig", "LocalGenerator"))
    register("openai", *_generator_backend("openai_backend", "OpenAIGeneratorConfig", "OpenAIGenerator"))
    register("python", *_generator_backend("python_backend", "PythonGeneratorConfig", "PythonGenerator"))
