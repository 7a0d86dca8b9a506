"""``metareason lru bench-decode``: the group archs' decode comparison (Llama K/V, MLA latent cache
absorbed and decompressed, paged through mla_decode) writes what it measured, atomically."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from metareason.cli import main
from metareason.plugins.lru import MLAAttention
from metareason.plugins.lru.bench_decode import build, decompress_at_decode, group_arch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lru"


def test_bench_decode_compares_the_caches_and_the_absorbed_form(tmp_path, capsys):
    assert main(["lru", "bench-decode", str(CONFIGS), "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels-decode-cpu-quick.json").read_text())
    assert result["command"].startswith("metareason lru bench-decode") and not list(tmp_path.glob("*.tmp"))
    r = result["runs"][0]
    models = r["models"]
    assert set(models) == {"A_llama", "B_mla_dynamic", "B_mla_dynamic_decompressed", "B_mla_paged_kernel"}
    assert models["B_mla_paged_kernel"]["cache_type"] == "PagedLatentCache"
    # 4 layers x fp32: Llama caches K and V (2 x 128), MLA the latent + rope key (64 + 16)
    assert models["A_llama"]["cache_bytes_per_token"] == 4 * 4 * 2 * 128
    assert models["B_mla_dynamic"]["cache_bytes_per_token"] == 4 * 4 * (64 + 16)
    assert models["B_mla_dynamic_decompressed"]["cache_bytes_per_token"] == 4 * 4 * (64 + 16)
    # the paged cache allocates whole 64-row blocks: at least the latent bytes, at most one block more per row
    paged = models["B_mla_paged_kernel"]
    tokens = r["batch"] * (r["prompt"] + r["new_tokens"])
    assert 4 * 4 * 80 <= paged["cache_bytes_per_token"] <= 4 * 4 * 80 * (tokens + r["batch"] * 64) / tokens
    assert all(m["decode_tokens_per_s"] > 0 for m in models.values())
    dyn = models["B_mla_dynamic"]
    assert dyn["vs_decompressed"] == pytest.approx(
        dyn["decode_tokens_per_s"] / models["B_mla_dynamic_decompressed"]["decode_tokens_per_s"])


def test_the_decompressed_baseline_decodes_through_the_expanded_form(monkeypatch):
    """The baseline row measures what it says: with the absorbed form off, decode steps decompress."""
    import torch

    seen = []
    original = MLAAttention._absorbed
    monkeypatch.setattr(MLAAttention, "_absorbed", lambda self, *a, **k: seen.append(1) or original(self, *a, **k))
    model = build(group_arch(CONFIGS, "B_mla"), 64, "dynamic", absorbed=True)
    ids = torch.randint(3, 64, (1, 4))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert seen
    seen.clear()
    assert decompress_at_decode(model) == model.config.num_hidden_layers
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert seen == [] and torch.equal(out, ref)  # same tokens, another route


def test_bench_decode_names_a_missing_group_config(tmp_path, capsys):
    assert main(["lru", "bench-decode", str(tmp_path), "--quick", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "a_llama.yaml: group config not found" in err
