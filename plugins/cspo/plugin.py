"""Hook implementations of the cspo plugin (MERA meta-cognitive control).

Registered always: the ``cspo`` config section, the task ``causal_loop_overthink`` and the
reward functions ``cspo_correct`` / ``cspo_structure`` / ``cspo_length``, and the
``metareason cspo`` commands. Active only with ``cspo.enabled: true``: the control tokens
``<control>`` / ``</control>`` and the CSPO token loss mask (``cspo.mask_rl_loss``).
"""
from __future__ import annotations

from metareason.api import hookimpl


def _section(config):
    cs = getattr(config, "cspo", None)
    return cs if cs is not None and cs.enabled else None


@hookimpl
def metareason_config_sections():
    from metareason.plugins.cspo.config import CSPOSection

    return {"cspo": CSPOSection}


@hookimpl
def metareason_special_tokens(config):
    if _section(config) is None:
        return None
    from metareason.api import SpecialToken
    from metareason.plugins.cspo.segments import CONTROL_TOKENS

    return [SpecialToken(t) for t in CONTROL_TOKENS]


def _overthink(params, seed, num_samples):
    from metareason.plugins.cspo.overthink import make_task

    return make_task(params, seed, num_samples)


@hookimpl
def metareason_register_tasks(register):
    register("causal_loop_overthink", _overthink)


@hookimpl
def metareason_register_rewards(register):
    from metareason.plugins.cspo.rewards import REWARDS

    for name, fn in REWARDS.items():
        register(name, fn)


@hookimpl
def metareason_rl_loss_mask(completion_ids, completion_mask, tokenizer, config):
    """CSPO: the policy loss only on tokens of complete control segments (tags included)."""
    cs = _section(config)
    if cs is None or not cs.mask_rl_loss:
        return None
    from metareason.plugins.cspo.segments import control_mask

    return control_mask(completion_ids, tokenizer) & completion_mask.bool()


@hookimpl
def metareason_cli_commands(subparsers):
    from metareason.plugins.cspo.cli import add_commands

    add_commands(subparsers)
