"""Adding special tokens: tokenizer first, then embedding rows initialised from a mean.

New rows start at the mean of chosen words' embeddings (``init_from``) or of the whole
vocabulary, never at random noise: a random row has a norm unlike any trained row and gives
the new token a large, arbitrary logit at the start of training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch


@dataclass(frozen=True)
class SpecialToken:
    """A token to add. ``init_from``: words whose mean embedding starts its rows. ``trainable``:
    under LoRA its input and output rows are trained too (peft ``trainable_token_indices``); other
    rows of the matrices stay frozen under LoRA, so a token the model must learn to write needs it."""
    text: str
    init_from: tuple[str, ...] = field(default_factory=tuple)
    trainable: bool = False


def normalise(items: Iterable[Union[str, SpecialToken]]) -> list[SpecialToken]:
    out: dict[str, SpecialToken] = {}
    for item in items:
        tok = SpecialToken(item) if isinstance(item, str) else item
        if not isinstance(tok, SpecialToken) or not tok.text:
            raise ValueError(f"special token must be a non-empty string or SpecialToken, got {item!r}")
        out.setdefault(tok.text, tok)
    return list(out.values())


def add_special_tokens(tokenizer: Any, model: Optional[torch.nn.Module],
                       tokens: Iterable[Union[str, SpecialToken]]) -> list[int]:
    """Add ``tokens`` to the tokenizer, resize ``model`` and initialise the new rows.

    Returns the ids of the tokens that were new. Tokens already in the vocabulary are kept
    as they are.
    """
    specs = normalise(tokens)
    vocab = tokenizer.get_vocab()
    new = [t for t in specs if t.text not in vocab]
    if not new:
        return []
    old_len = len(tokenizer)
    tokenizer.add_tokens([t.text for t in new], special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t.text) for t in new]
    if model is None:
        return ids
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init_rows(model, tokenizer, new, ids, min(old_len, old_rows))
    return ids


@torch.no_grad()
def init_rows(model: torch.nn.Module, tokenizer: Any, specs: list[SpecialToken], ids: list[int],
              n_old: int) -> None:
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    for weight in matrices:
        overall = weight[:n_old].float().mean(dim=0)
        for spec, idx in zip(specs, ids):
            source: list[int] = []
            for word in spec.init_from:
                source += [i for i in tokenizer.encode(word, add_special_tokens=False) if i < n_old]
            row = weight[source].float().mean(dim=0) if source else overall
            weight[idx] = row.to(weight.dtype)


def token_row_targets(model: torch.nn.Module, token_ids: list[int]) -> dict[str, list[int]]:
    """``{module name: ids}`` for peft's trainable token rows: the input embedding, and the output
    layer unless it is tied to the input one (peft then ties the output rows to the input rows)."""
    base = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "base_model") else model

    def name(module):
        return next(n for n, m in base.named_modules() if m is module).split(".")[-1]

    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    targets = {name(base.get_input_embeddings()): list(token_ids)}
    out = base.get_output_embeddings()
    if out is not None and not getattr(cfg, "tie_word_embeddings", False):
        targets[name(out)] = list(token_ids)
    return targets
