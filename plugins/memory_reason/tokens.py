"""The step-type vocabulary: ``<prefix_i>`` (i < n_prefix) and ``<memory_j>`` / ``<reason_j>`` /
``<answer_j>`` (j < n_special), names from the config, each with the word its rows start from."""
from __future__ import annotations

from dataclasses import dataclass

STEP_TYPES = ("memory", "reason", "answer")


@dataclass(frozen=True)
class Vocabulary:
    prefix: str  # the n_prefix general tokens, concatenated
    types: dict[str, str]  # step type -> its n_special tokens, concatenated
    names: dict[str, str]  # step type -> configured name (memory -> "rag" in the paper's code)
    prefix_name: str
    filler_name: str = ""  # set in the filler control: every type's run is the same untyped filler tokens

    @property
    def all_tokens(self) -> list[str]:
        out = split_tokens(self.prefix) + [t for s in STEP_TYPES for t in split_tokens(self.types[s])]
        return list(dict.fromkeys(out))


def split_tokens(run: str) -> list[str]:
    """``"<a_0><a_1>"`` -> ``["<a_0>", "<a_1>"]``."""
    return [part + ">" for part in run.split(">") if part]


def vocabulary(section) -> Vocabulary:
    names = {"memory": section.memory_name, "reason": section.reason_name, "answer": section.answer_name}
    prefix = "".join(f"<{section.prefix_name}_{i}>" for i in range(section.n_prefix))
    if getattr(section, "filler", False):  # the control arm: as many tokens, no type information
        run = "".join(f"<{section.filler_name}_{j}>" for j in range(section.n_special))
        return Vocabulary(prefix, {t: run for t in STEP_TYPES}, names, section.prefix_name, section.filler_name)
    types = {t: "".join(f"<{names[t]}_{j}>" for j in range(section.n_special)) for t in STEP_TYPES}
    return Vocabulary(prefix, types, names, section.prefix_name)


def special_tokens(section) -> list:
    """``SpecialToken``s for the kernel: a type's rows start from the embedding of its init word
    (the mean of the word's pieces), prefix rows from the vocabulary mean."""
    from metareason.api import SpecialToken

    voc = vocabulary(section)
    tuned = section.mode == "lora+prompt-tuning"  # the kernel's LoRA adapter trains these rows too
    out = [SpecialToken(t, trainable=tuned) for t in split_tokens(voc.prefix)]
    if voc.filler_name:  # untyped: the filler rows start at the vocabulary mean, as the prefix rows
        return out + [SpecialToken(t, trainable=tuned) for t in split_tokens(voc.types["memory"])]
    for step_type in STEP_TYPES:
        word = section.init_words.get(step_type)
        init = (word,) if word else ()
        out += [SpecialToken(t, init_from=init, trainable=tuned) for t in split_tokens(voc.types[step_type])]
    return out
