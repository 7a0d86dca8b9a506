"""How much the answer line attends to the memory steps and to the reason steps.

For each of a few eval completions: one forward pass over prompt + completion with eager
attention; for every layer, the attention of each answer-line token (query), averaged over
heads, is summed over the key positions of each category (prompt, memory steps, reason steps,
the answer line itself; newlines between steps are left out); averaged over answer tokens and
completions. Steps without a type token take the gold step's type at the same position.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from metareason.api import atomic_file
from metareason.plugins.memory_reason.steps import parse_generated

CATEGORIES = ("prompt", "memory", "reason", "answer")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _categories(completion: str, offsets, voc, answer_prefix: str, gold: Optional[list]) -> Optional[list]:
    steps = parse_generated(completion, voc, answer_prefix)
    kinds, k = [], 0
    for st in steps:
        kind = st.type
        if st.type != "answer":
            if kind is None and gold and k < len(gold):
                kind = gold[k]["type"]
            k += 1
        kinds.append(kind)
    if "answer" not in kinds:
        return None
    out = []
    for a, b in offsets:
        cat = None
        for st, kind in zip(steps, kinds):
            if st.start <= a < max(st.end, st.start + 1) and kind in CATEGORIES:
                cat = kind
                break
        out.append(cat)
    return out


@torch.no_grad()
def attention_shares(model, tokenizer, samples: list[dict], voc, answer_prefix: str) -> Optional[torch.Tensor]:
    """``[layers, 4]`` mean attention mass of answer tokens per category, or ``None``."""
    from metareason.api import prompt_ids

    if not getattr(tokenizer, "is_fast", False):
        return None
    base = _base(model)
    device = next(model.parameters()).device
    previous = base.config._attn_implementation
    was_training = model.training
    total, used = None, 0
    try:
        base.set_attn_implementation("eager")
        model.eval()
        for s in samples:
            p_ids = prompt_ids(tokenizer, s["prompt"])
            enc = tokenizer(s["completion"], add_special_tokens=False, return_offsets_mapping=True)
            cats = _categories(s["completion"], enc["offset_mapping"], voc, answer_prefix,
                               (s.get("example") or {}).get("cot_steps"))
            if cats is None or not enc["input_ids"]:
                continue
            cats = ["prompt"] * len(p_ids) + cats
            ids = torch.tensor([p_ids + enc["input_ids"]], device=device)
            att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
            queries = [i for i, c in enumerate(cats) if c == "answer"]
            shares = torch.zeros(len(att), len(CATEGORIES))
            for layer, a in enumerate(att):
                rows = a[0].float().mean(0)[queries]  # [answer tokens, T]
                for j, cat in enumerate(CATEGORIES):
                    keys = [i for i, c in enumerate(cats) if c == cat]
                    if keys:
                        shares[layer, j] = rows[:, keys].sum(-1).mean().cpu()
            total = shares if total is None else total + shares
            used += 1
    finally:
        base.set_attn_implementation(previous)
        model.train(was_training)
    return None if total is None else total / used


def plot_heatmap(shares: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = shares.numpy()
    fig, ax = plt.subplots(figsize=(5.5, 1.2 + 0.45 * data.shape[0]))
    im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-6), aspect="auto")
    ax.set_xticks(range(len(CATEGORIES)), [f"{c} steps" if c in ("memory", "reason") else c for c in CATEGORIES])
    ax.set_yticks(range(data.shape[0]), [f"layer {i}" for i in range(data.shape[0])])
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="w" if data[i, j] < 0.5 * data.max() else "k",
                    fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
