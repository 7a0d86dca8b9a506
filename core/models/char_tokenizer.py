"""A character-level tokenizer for synthetic tasks.

Built with the ``tokenizers`` library (a WordLevel model over single characters) and wrapped as
a ``PreTrainedTokenizerFast``, so it saves with ``save_pretrained`` and loads back with
``AutoTokenizer.from_pretrained`` like any Hugging Face tokenizer, and special tokens added
later (``<control>`` ...) are matched whole before the text is split into characters.
"""
from __future__ import annotations

import string
from typing import Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DEFAULT_ALPHABET = "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))


def build_char_tokenizer(alphabet: Optional[str] = None) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``alphabet`` (default: printable ASCII)."""
    chars = list(dict.fromkeys(alphabet if alphabet is not None else DEFAULT_ALPHABET))
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    wrapped.padding_side = "right"
    return wrapped
