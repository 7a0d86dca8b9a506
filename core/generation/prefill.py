"""The shared-prompt prefill that the lean loop and the model's own ``generate`` both start from."""
from __future__ import annotations

import torch

from metareason.models.compat import CACHE_KWARG


@torch.no_grad()
def shared_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """A ``DynamicCache`` of all but the last prompt token of every row, each distinct prompt
    (consecutive identical rows) computed once and gathered out to its rows; ``None`` when no
    prompt repeats. ``generate`` given this cache runs only the last prompt token per row."""
    from transformers import DynamicCache

    if input_ids.shape[1] < 2:
        return None
    key = torch.cat([input_ids, attention_mask.long()], dim=1)
    unique, inverse = torch.unique_consecutive(key, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return None
    width = input_ids.shape[1]
    ids, mask = unique[:, : width - 1], unique[:, width:-1]
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache(config=config)
    kwargs = {}
    if not bool(mask.all()):
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1, **kwargs)
    cache.batch_select_indices(inverse)
    return cache
