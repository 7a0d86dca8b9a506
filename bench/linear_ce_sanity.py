"""One SFT forward + backward on SmolLM2-135M's architecture (random init, fp32, CPU): the
loop's own ``forward_batch`` with ``train.fused_ce`` off (full logits) and on (fused linear
cross-entropy); and the output layer + loss alone (``--head-only``: hidden states [tokens, 576],
the tied [49152, 576] weight, ``linear_cross_entropy`` and ``linear_token_logps`` against their
unfused references, and the share of the fused op's time in GEMMs). A sanity row for issue 35,
not the benchmark against HF Trainer.

    python bench/linear_ce_sanity.py [--batch 2] [--seq 512] [--threads 2] [--repeats 3] [--head-only]

Peak memory is allocated tensor memory during the step (the PyTorch profiler's allocation
events, running sum), not process RSS; times are the best of ``--repeats`` steps per mode,
alternating the modes in one process.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def smollm2_135m():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().train()


def peak_allocated(fn) -> int:
    """Peak of the running sum of allocations minus frees while ``fn`` runs (blocks allocated
    before it and freed during it would count negative: callers free nothing older)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    from metareason.train.sft import forward_batch

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.head_only:
        return head_only(args)
    model = smollm2_135m()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt quarter, as SFT masks it
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step(fused: bool) -> float:
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: not counted as step memory
        _, loss, _, _ = forward_batch(model, batch, labels, torch.device("cpu"), 0, False, "none", fused)
        loss.backward()
        return float(loss.detach())

    losses = {m: step(m) for m in (False, True)}  # warm-up (and the gradient buffers)
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for mode in (False, True):
            t0 = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t0)
    peaks = {m: peak_allocated(lambda: step(m)) for m in (False, True)}
    tokens = args.batch * args.seq
    out = {"model": "SmolLM2-135M architecture, random init, fp32", "batch": args.batch, "seq": args.seq,
           "threads": args.threads, "loss": {"unfused": losses[False], "fused": losses[True]}}
    for name, m in (("unfused", False), ("fused", True)):
        out[name] = {"step_s_best": min(times[m]), "step_s_all": times[m], "tokens_per_s": tokens / min(times[m]),
                     "peak_step_memory_mb": peaks[m] / 2**20}
    out["fused_vs_unfused"] = {"speed": min(times[False]) / min(times[True]),
                               "peak_memory": peaks[True] / peaks[False]}
    print(json.dumps(out, indent=1))


def gemm_share(fn) -> float:
    """Share of the op's CPU time (profiler self time) spent in GEMMs: what a compiled epilogue
    (the softmax / gradient elementwise work fused into one pass) could at most remove is the rest."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))
    return gemm / max(total, 1)


def head_only(args) -> None:
    from metareason.ops.linear_ce import linear_cross_entropy, linear_token_logps

    g = torch.Generator().manual_seed(0)
    tokens = args.batch * args.seq
    hidden = torch.randn(tokens, 576, generator=g).requires_grad_()
    weight = (torch.randn(49152, 576, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, 49152, (tokens,), generator=g)
    ignored = targets.clone()
    ignored[: tokens // 4] = -100
    upstream = torch.randn(tokens, generator=g)
    ops = {  # name: (what, fn(backend) -> a scalar to backpropagate)
        "sft_loss": ("linear_cross_entropy, a quarter of the targets ignored",
                     lambda b: linear_cross_entropy(hidden, weight, ignored, backend=b)),
        "grpo_logps": ("linear_token_logps, temperature 0.9, per-token upstream gradient",
                       lambda b: (linear_token_logps(hidden, weight, targets, temperature=0.9, backend=b)
                                  * upstream).sum()),
    }
    out = {"shape": f"{tokens} tokens, H=576, V=49152, fp32", "threads": args.threads}
    for op, (what, fn) in ops.items():
        def step(backend: str) -> None:  # gradients start as None (freed outside a profiled step)
            fn(backend).backward()
            hidden.grad = weight.grad = None

        backends = ("reference", "cpu")
        for b in backends:
            step(b)
        times = {b: [] for b in backends}
        for _ in range(args.repeats):
            for b in backends:
                t0 = time.perf_counter()
                step(b)
                times[b].append(time.perf_counter() - t0)
        peaks = {b: peak_allocated(lambda: step(b)) for b in backends}
        row = {"what": what}
        for name, b in (("unfused", "reference"), ("fused", "cpu")):
            row[name] = {"step_s_best": min(times[b]), "step_s_all": times[b], "peak_step_memory_mb": peaks[b] / 2**20}
        row["fused_vs_unfused"] = {"speed": min(times["reference"]) / min(times["cpu"]),
                                   "peak_memory": peaks["cpu"] / peaks["reference"]}
        row["fused_gemm_share"] = gemm_share(lambda: step("cpu"))
        out[op] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
