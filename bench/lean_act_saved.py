"""Bytes autograd saves for backward over one SFT forward (fused CE), train.lean_activations off
vs on, on SmolLM2-135M's architecture (random init, fp32): distinct storages through
``torch.autograd.graph.saved_tensors_hooks``, parameters left out. Not a timing and not the
profiled step peak (``metareason bench train`` measures that); what the patch removes.

    python bench/lean_act_saved.py [--tokens 256] [--model DIR]
"""
from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from metareason.train import lean_act
from metareason.train.fused_ce import fused_token_loss, hidden_forward


def saved_bytes(model, ids) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = fused_token_loss(hidden_forward(model, input_ids=ids, use_cache=False), ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/metareason/models/smollm2-135m-instruct"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(cfg).float().train()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    off = saved_bytes(model, ids)
    print(lean_act.lean_activations_mode(True, model)[1])
    on = saved_bytes(model, ids)
    per = 4096 / args.tokens / 2 ** 20
    print(f"saved for backward per token: off {off / args.tokens / 1024:.1f} KiB, on {on / args.tokens / 1024:.1f} "
          f"KiB (x{on / off:.3f}); at 8 x 512 tokens: off {off * per:.0f} MiB, on {on * per:.0f} MiB")


if __name__ == "__main__":
    main()
