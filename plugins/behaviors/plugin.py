"""Hook implementations of the behaviors plugin (metacognitive reuse, arXiv 2509.13237).

Registered always: the ``behaviors`` config section, the demonstration task ``behavior_chain``
and the ``metareason behaviors`` commands. Active only with ``behaviors.enabled: true``:

* ``metareason_transform_prompt``: behavior-conditioned inference (with ``behaviors.bci.enabled``):
  K retrieved behaviors are prepended to every prompt, in training and in generation;
* ``metareason_on_eval_samples``: citations of handbook behaviors in evaluated completions are
  counted into the handbook (cited, cited in a correct answer) when ``behaviors.bci.count_citations``;
* ``metareason_on_eval``: adds ``eval/behaviors/*`` metrics; retrieval counts are flushed to the
  handbook here and at the end of a run.
"""
from __future__ import annotations

from metareason.api import hookimpl


def _section(config):
    section = getattr(config, "behaviors", None)
    return section if section is not None and section.enabled else None


@hookimpl
def metareason_config_sections():
    from metareason.plugins.behaviors.config import BehaviorsSection

    return {"behaviors": BehaviorsSection}


def _behavior_chain(params, seed, num_samples):
    from metareason.plugins.behaviors.demo_task import make_task

    return make_task(params, seed, num_samples)


@hookimpl
def metareason_register_tasks(register):
    register("behavior_chain", _behavior_chain)


@hookimpl
def metareason_transform_prompt(prompt, example, config):
    section = _section(config)
    if section is None or not section.bci.enabled:
        return None
    from metareason.plugins.behaviors.bci import STATE

    return STATE.transform(section, prompt, example)


@hookimpl
def metareason_on_eval_samples(kernel, step, samples):
    section = _section(kernel.config)
    if section is None or not section.bci.count_citations:
        return None
    from metareason.plugins.behaviors.bci import STATE

    STATE.count_citations(section, samples)
    return None


@hookimpl
def metareason_on_eval(kernel, step, metrics):
    section = _section(kernel.config)
    if section is None:
        return None
    from metareason.plugins.behaviors.bci import STATE

    if section.bci.count_citations:
        metrics.update(STATE.last_eval)
        STATE.last_eval = {}
    if section.bci.enabled:
        STATE.flush(section)
    return None


@hookimpl
def metareason_on_run_start(kernel, run_dir):
    """Fail before training, not at its first evaluation, when the handbook is missing or bad."""
    section = _section(kernel.config)
    if section is None or not (section.bci.enabled or section.bci.count_citations):
        return None
    from metareason.plugins.behaviors.bci import shared_handbook

    shared_handbook(section)
    return None


@hookimpl
def metareason_on_run_end(kernel, metrics):
    section = _section(kernel.config)
    if section is None or not section.bci.enabled:
        return None
    from metareason.plugins.behaviors.bci import STATE

    STATE.flush(section)
    return None


@hookimpl
def metareason_cli_commands(subparsers):
    from metareason.plugins.behaviors.cli import add_commands

    add_commands(subparsers)
