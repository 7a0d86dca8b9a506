"""Hook implementations of the brevity plugin.

Registered always: the ``brevity`` config section and the reward ``brevity``. Active only with
``brevity.enabled: true``: the prompt hint and the eval metrics ``eval/brevity/*``.
"""
from metareason.api import hookimpl


def _section(config):
    sec = getattr(config, "brevity", None)
    return sec if sec is not None and sec.enabled else None


@hookimpl
def metareason_config_sections():
    from metareason_brevity.config import BrevitySection

    return {"brevity": BrevitySection}


@hookimpl
def metareason_transform_prompt(prompt, config):
    sec = _section(config)
    return None if sec is None else sec.hint + prompt  # None: keep the prompt as it is


def brevity_reward(completions, examples, config):
    """1 for a completion of at most ``brevity.max_chars`` characters, less the longer it gets."""
    limit = config.brevity.max_chars
    return [min(1.0, limit / max(1, len(c))) for c in completions]


@hookimpl
def metareason_register_rewards(register):
    register("brevity", brevity_reward)


@hookimpl
def metareason_on_eval_samples(kernel, samples):
    sec = _section(kernel.config)
    if sec is None or not samples:
        return None
    chars = [len(s["completion"]) for s in samples]
    return {"eval/brevity/chars": sum(chars) / len(chars),
            "eval/brevity/within_limit": sum(n <= sec.max_chars for n in chars) / len(chars)}
