"""``metareason lru bench-decode CONFIG_DIR``: greedy decoding of the LRU-paper archs, one run.

Models built from two group configs of the ZeroModel experiment (``CONFIG_DIR/a_llama.yaml`` and
``CONFIG_DIR/b_mla.yaml``, i.e. configs/lru/ in a checkout; random weights, the same size):

* ``A_llama``: Llama, K/V ``DynamicCache``;
* ``B_mla_dynamic``: ``deepseek_mla`` with the ``dynamic`` latent cache, decode steps in the
  absorbed form (scores against the cached latents, ``MLAAttention._absorbed``);
* ``B_mla_dynamic_decompressed``: the same model and cache with the absorbed form switched off,
  so every decode step decompresses all cached latents into per-head keys and values
  (``MLAAttention._expanded``): what the absorbed form saves;
* ``B_mla_paged_kernel``: the ``paged`` cache (latents in 64-row pages, attention through
  ``metareason.ops.mla_decode`` on absorbed queries).

Per model: decode tokens/s (batch × new tokens over the time of the ``new`` one-token forward
calls after a prefill; prefill excluded) and cache bytes per cached token (all layers, as
allocated: the paged cache counts whole 64-row blocks).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from metareason.api import UserError

GROUPS = {"A_llama": "a_llama.yaml", "B_mla": "b_mla.yaml"}
#: label -> (group, decode_cache, absorbed form on)
MODELS = {"A_llama": ("A_llama", None, True), "B_mla_dynamic": ("B_mla", "dynamic", True),
          "B_mla_dynamic_decompressed": ("B_mla", "dynamic", False),
          "B_mla_paged_kernel": ("B_mla", "paged", True)}


def group_arch(config_dir: str | Path, name: str) -> dict:
    """``model.arch`` of group ``name``'s config in ``config_dir``."""
    path = Path(config_dir) / GROUPS[name]
    if not path.is_file():
        raise UserError(f"{path}: group config not found (bench-decode reads {', '.join(GROUPS.values())} "
                        "from CONFIG_DIR, e.g. configs/lru/)")
    try:
        return dict(yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["arch"])
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: expected a run config with model.arch ({type(exc).__name__})") from None


def build(arch: dict, vocab: int, decode_cache: str | None = None, absorbed: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM

    arch = dict(arch)
    model_type = arch.pop("model_type")
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        return LlamaForCausalLM(LlamaConfig(**arch, **common)).eval()
    model = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(**arch, **common, decode_cache=decode_cache)).eval()
    if not absorbed:
        decompress_at_decode(model)
    return model


def decompress_at_decode(model) -> int:
    """Switch the absorbed decode form off in every MLA layer (a benchmark baseline: each decode
    step then decompresses the whole cached latent). Returns the number of layers switched."""
    from metareason.plugins.lru import MLAAttention

    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    for m in layers:
        m._can_absorb = lambda: False
    return len(layers)


def cache_bytes(cache) -> int:
    if hasattr(cache, "bytes_used"):
        return cache.bytes_used()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def measure(model, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """Prefill once, then ``new`` greedy steps called one by one (decode time only, no generate()
    bookkeeping); best of ``repeats``."""
    from metareason.api import CACHE_KWARG

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g)
    best, cache = float("inf"), None
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round is a warm-up
            mask = torch.ones_like(ids)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache, tok = getattr(out, CACHE_KWARG), out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new):
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                out = model(input_ids=tok, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
                cache, tok = getattr(out, CACHE_KWARG), out.logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - t0) if _ else best
    tokens = batch * (prompt + new)
    return dict(decode_tokens_per_s=batch * new / best, decode_s=best, cache_bytes=cache_bytes(cache),
                cache_bytes_per_token=cache_bytes(cache) / tokens, cache_type=type(cache).__name__)


def run_decode(config_dir: str | Path, settings=((4, 384, 64), (4, 2048, 32)), repeats: int = 2,
               threads: int | None = None) -> dict:
    """``settings``: (batch, prompt, new tokens) per comparison; the long prompt is where the
    attention over the cache (the op) weighs most in a step."""
    if threads:
        torch.set_num_threads(threads)
    archs = {name: group_arch(config_dir, name) for name in GROUPS}
    vocab = 64
    runs = []
    for batch, prompt, new in settings:
        rows = {}
        for label, (group, mode, absorbed) in MODELS.items():
            print(f"[bench] decode {label}: batch {batch}, prompt {prompt}, {new} new tokens ...", flush=True)
            model = build(archs[group], vocab, mode, absorbed)
            rows[label] = dict(measure(model, batch, prompt, new, repeats),
                               params=sum(p.numel() for p in model.parameters()))
        base = rows["B_mla_dynamic"]["decode_tokens_per_s"]
        for r in rows.values():
            r["vs_mla_dynamic"] = r["decode_tokens_per_s"] / base
        rows["B_mla_dynamic"]["vs_decompressed"] = base / rows["B_mla_dynamic_decompressed"]["decode_tokens_per_s"]
        runs.append(dict(batch=batch, prompt=prompt, new_tokens=new, models=rows))
    return dict(repeats=repeats, threads=torch.get_num_threads(), runs=runs)


def print_decode(result: dict) -> None:
    for run in result["runs"]:
        print(f"\ndecode, batch {run['batch']}, prompt {run['prompt']}, {run['new_tokens']} new tokens")
        print(f"{'model':<28} {'tok/s':>9} {'x dyn':>6} {'cache B/token':>14} {'cache':>18}")
        for label, r in run["models"].items():
            print(f"{label:<28} {r['decode_tokens_per_s']:>9.1f} {r['vs_mla_dynamic']:>6.2f} "
                  f"{r['cache_bytes_per_token']:>14.0f} {r['cache_type']:>18}")
