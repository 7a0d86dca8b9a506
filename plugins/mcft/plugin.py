"""Hook implementations of the mcft plugin (masked critique fine-tuning).

Registered always: the ``mcft`` config section, the task ``mcft`` (critique data from CSV or
JSONL), the rewards ``mcft_correct`` / ``mcft_format`` and the ``metareason mcft`` commands.
Active only with ``mcft.enabled: true``: the eight format tags as special tokens, critique
masking of SFT labels (``mcft.threshold``), the format term (``mcft.bf_beta``) in the SFT and RL
loops, and ``eval/mcft_format`` (share of well-formed completions) in evaluations.
"""
from __future__ import annotations

from metareason.api import hookimpl


def _section(config):
    sec = getattr(config, "mcft", None)
    return sec if sec is not None and sec.enabled else None


def tag_ids(tokenizer) -> list[int]:
    from metareason.plugins.mcft.format import TAGS

    ids = [tokenizer.convert_tokens_to_ids(t) for t in TAGS]
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids):
        raise ValueError("mcft: the format tags are not in the tokenizer's vocabulary (is mcft.enabled set "
                         "when the model is loaded?)")
    return ids


@hookimpl
def metareason_config_sections():
    from metareason.plugins.mcft.config import MCFTSection

    return {"mcft": MCFTSection}


@hookimpl
def metareason_special_tokens(config):
    if _section(config) is None:
        return None
    from metareason.api import SpecialToken
    from metareason.plugins.mcft.format import TAGS

    # each tag's rows start at the mean of its spelled-out pieces ("</ critique >"), not all at the
    # same vocabulary mean; under LoRA they are trained too (trainable=True): frozen, a tag's row sits
    # near the row of "<" and a LoRA-tuned model writes "<" in its place (SmolLM2, issue 30)
    return [SpecialToken(t, init_from=(t.replace("<", "< ").replace(">", " >"),), trainable=True) for t in TAGS]


@hookimpl
def metareason_prepare_model(model, tokenizer, config):
    sec = _section(config)
    if sec is not None:
        sec.set_tag_ids(tag_ids(tokenizer))
    return None


def _make_task(params, seed, num_samples):
    from metareason.plugins.mcft.data import make_task

    return make_task(params, seed, num_samples)


@hookimpl
def metareason_register_tasks(register):
    register("mcft", _make_task)


@hookimpl
def metareason_register_rewards(register):
    from metareason.plugins.mcft.answers import correct_reward
    from metareason.plugins.mcft.format import format_reward

    register("mcft_correct", correct_reward)
    register("mcft_format", format_reward)


@hookimpl
def metareason_sft_labels(labels, batch, tokenizer, config):
    """Critique masking: drop label tokens inside <think> with probability ``mcft.threshold``."""
    sec = _section(config)
    if sec is None or sec.threshold <= 0:
        return None
    from metareason.plugins.mcft.format import THINK, THINK_END
    from metareason.plugins.mcft.masking import critique_mask

    new, _ = critique_mask(batch["input_ids"], labels, batch["prompt_lengths"], batch.get("examples") or [],
                           int(batch.get("epoch", 0)), think_id=tokenizer.convert_tokens_to_ids(THINK),
                           think_end_id=tokenizer.convert_tokens_to_ids(THINK_END), threshold=sec.threshold,
                           offset=sec.mask_offset, seed=config.train.seed)
    return new


@hookimpl
def metareason_extra_losses(batch, outputs, config):
    """``mcft_format``: ``(bf_beta, 1 - mean p(tag))``; absent when ``bf_beta == 0``."""
    sec = _section(config)
    if sec is None or sec.bf_beta <= 0:
        return None
    ids = sec.tag_ids
    if ids is None:
        raise ValueError("mcft: no tag ids for this run (the model was not loaded through the kernel)")
    from metareason.plugins.mcft.format_loss import rl_format_term, sft_format_term

    if batch.get("rl"):
        width = batch["width"]
        term = rl_format_term(outputs.logps, batch["completion_ids"], batch["attention_mask"][:, -width:], ids)
    else:
        term = sft_format_term(outputs.logits, batch["input_ids"], batch["prompt_lengths"],
                               batch["attention_mask"], ids)
    return None if term is None else {"mcft_format": (sec.bf_beta, term)}


@hookimpl
def metareason_on_eval_samples(kernel, samples):
    if _section(kernel.config) is None or not samples:
        return
    from metareason.plugins.mcft.format import is_well_formed

    return {"eval/mcft_format": sum(is_well_formed(s["completion"]) for s in samples) / len(samples)}


@hookimpl
def metareason_cli_commands(subparsers):
    from metareason.plugins.mcft.cli import add_commands

    add_commands(subparsers)
