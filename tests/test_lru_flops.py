"""plugins/lru/flops.py: the per-token FLOPs estimate of groups A-E equals the matmul FLOPs that
torch's FlopCounterMode counts in a real forward of each group's model (non-causal count: torch
counts full attention matrices), and the causal context, mean iterations and errors behave."""
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from metareason.plugins.lru import DeepSeekMLAConfig, DeepSeekMLAForCausalLM
from metareason.plugins.lru.flops import flops_per_token, group_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lru"
VOCAB = 101  # the character tokenizer


def arch_of(name):
    return dict(yaml.safe_load((CONFIGS / name).read_text())["model"]["arch"])


def math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Attention as plain matmuls (FlopCounterMode does not count the CPU sdpa kernel)."""
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, -1) @ v


def counted(arch, seq_len):
    kw = {k: v for k, v in arch.items() if k != "model_type"}
    torch.manual_seed(0)
    if arch["model_type"] == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attn_implementation="sdpa", **kw))
    else:
        model = DeepSeekMLAForCausalLM(DeepSeekMLAConfig(vocab_size=VOCAB, **kw))
    ids = torch.randint(3, VOCAB, (1, seq_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops() / seq_len


@pytest.mark.parametrize("name,group,extra", [
    ("a_llama.yaml", "A", {}), ("b_mla.yaml", "B", {}), ("c_mla_lru_fixed.yaml", "C", {}),
    ("d_mla_lru_act.yaml", "D", {}), ("e_mla_lru_chain.yaml", "E", {"lru_fixed_iterations": True}),
])
def test_estimate_equals_counted_matmul_flops(name, group, extra, monkeypatch):
    monkeypatch.setenv("METAREASON_OPS", "reference")  # the LRU as torch matmuls (the masked loop: N steps)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", math_sdpa)
    arch = dict(arch_of(name), **extra)
    assert group_of(arch) == group
    est = flops_per_token(arch, seq_len=12, vocab_size=VOCAB, causal=False)
    extra = 0
    if group in "CDE":  # FlopCounterMode does not count matrix-vector products (the halting unit w_p·h)
        extra -= arch["num_hidden_layers"] * arch["lru_max_iterations"] * 2 * arch["kv_latent_dim"]
    if group == "E":  # chain.py does the read's RoPE as a matmul (rotated halves of q and k, 2·2·k·d per step)
        k, d, layers = arch["lru_read_dim"], arch["kv_latent_dim"], arch["num_hidden_layers"]
        extra += layers * arch["lru_max_iterations"] * 2 * 2 * k * d
        extra += layers * 2 * 2 * k * k * d / 12  # ... whose weights R·W_rq, R·W_rk are made once per forward
    assert est["total"] + extra == pytest.approx(counted(arch, 12), rel=1e-9)
    assert (est["lru"] > 0) == (group in "CDE") and (est["lru_read"] > 0) == (group == "E")


def test_causal_context_iterations_and_errors():
    d, e = arch_of("d_mla_lru_act.yaml"), arch_of("e_mla_lru_chain.yaml")
    full = flops_per_token(d, 256, vocab_size=VOCAB, causal=False)
    half = flops_per_token(d, 256, vocab_size=VOCAB)
    assert half["attention_scores"] == pytest.approx(full["attention_scores"] * 257 / 2 / 256)
    one, eight = (flops_per_token(d, 64, n, vocab_size=VOCAB)["lru"] for n in (1, 8))
    assert one < eight and flops_per_token(d, 64, vocab_size=VOCAB)["lru"] == eight
    e2, e4 = (flops_per_token(e, 64, n, vocab_size=VOCAB) for n in (2, 4))
    assert e4["lru_read"] == pytest.approx(2 * e2["lru_read"])
    with pytest.raises(ValueError, match="mean_iterations: expected a number in"):
        flops_per_token(d, 64, 9, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size: the arch has none"):
        flops_per_token(d, 64)
    with pytest.raises(ValueError, match="model_type: expected llama or deepseek_mla"):
        flops_per_token({"model_type": "gpt2"}, 64, vocab_size=VOCAB)
