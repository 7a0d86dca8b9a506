"""Model and tokenizer loading: Hugging Face causal LMs, QLoRA, special tokens, char tokenizer."""
from metareason.models.char_tokenizer import build_char_tokenizer
from metareason.models.special_tokens import SpecialToken, add_special_tokens

__all__ = ["build_char_tokenizer", "SpecialToken", "add_special_tokens", "load_tokenizer", "load_model"]


def __getattr__(name):
    if name in ("load_tokenizer", "load_model"):
        from metareason.models import loader

        return getattr(loader, name)
    raise AttributeError(name)
