"""What differs between the transformers releases that setup.py's range admits.

transformers 5.24 renamed a model's KV cache argument and output field from ``past_key_values``
to ``cache`` (the old name is a deprecated alias on the way in and out). A model that takes only
``past_key_values`` silently receives ``cache=`` from ``generate()`` in its ``**kwargs`` and decodes
each new token without its history; code that passes a cache to a model must use the name the
installed release expects.
"""
from __future__ import annotations

from typing import Any

import transformers.generation.utils as _generation_utils

#: The keyword ``forward``/``generate`` take the KV cache under, and the output field holding it.
CACHE_KWARG: str = "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def cache_from_kwargs(cache: Any, past_key_values: Any) -> Any:
    """The cache a ``forward`` was given under either name (a model written for both releases)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as either `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values
