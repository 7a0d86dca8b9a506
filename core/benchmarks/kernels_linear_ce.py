"""``linear_ce`` rows of ``metareason bench kernels``: the fused linear cross-entropy (SFT loss,
forward + backward into the hidden states and the output weight) against the unfused reference
and, on CUDA when it is installed, Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (the peer).

Each backend (``cpu`` on the CPU; ``cuda`` = the chunked torch path and ``triton`` = the same
chunks with the Triton epilogue on a GPU) is timed interleaved with the reference (and the peer):
one call of each per round, median ratio and its range over the rounds. Peak memory on CUDA is
``torch.cuda.max_memory_allocated`` during one call, above what was allocated before it (inputs
and weights excluded); on the CPU it is not measured here (bench/linear_ce_sanity.py has the
profiler's figure).
"""
from __future__ import annotations

import statistics
from typing import Optional

import torch

from metareason.benchmarks.interleaved import interleaved, ratio
from metareason.ops import linear_cross_entropy
from metareason.ops.linear_ce import linear_cross_entropy_reference


def liger_loss():
    """``(LigerFusedLinearCrossEntropyLoss instance, None)`` or ``(None, why not)``."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # not installed, or its triton does not import
        return None, f"liger_kernel not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return LigerFusedLinearCrossEntropyLoss(), None


def _peak_bytes(fn, device: str) -> Optional[int]:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_linear_ce(N: int, H: int, V: int, dtype: torch.dtype, device: str, repeats: int, backend: str,
                    peer: bool) -> dict:

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype=dtype, device=device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype=dtype, device=device).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[: N // 4] = -100  # a quarter ignored (prompt tokens), as in SFT

    def step(loss_fn):
        def run():
            hidden.grad = weight.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.detach()
        return run

    fns = {"fused": step(lambda: linear_cross_entropy(hidden, weight, targets, backend=backend)),
           "reference": step(lambda: linear_cross_entropy_reference(hidden, weight, targets))}
    liger, liger_why = (liger_loss() if peer else (None, "no peer on this device"))
    if liger is not None:
        fns["liger"] = step(lambda: liger(weight, hidden, targets))
    loss_ref = fns["reference"]()
    g_ref = (hidden.grad.float().clone(), weight.grad.float().clone())
    loss_fused = fns["fused"]()
    err = dict(loss=float((loss_fused.float() - loss_ref.float()).abs()),
               grad_hidden=float((hidden.grad.float() - g_ref[0]).abs().max()),
               grad_weight=float((weight.grad.float() - g_ref[1]).abs().max()))
    peaks = {name: _peak_bytes(fn, device) for name, fn in fns.items()}
    times = interleaved(fns, device, repeats)
    row = dict(op="linear_ce", shape=dict(tokens=N, hidden=H, vocab=V, ignored=N // 4),
               dtype=str(dtype).replace("torch.", ""), backend=backend, rounds=len(times["fused"]),
               median_ms=statistics.median(times["fused"]) * 1e3,
               reference_ms=statistics.median(times["reference"]) * 1e3,
               vs_reference=ratio(times, "reference")[0], vs_reference_range=ratio(times, "reference")[1],
               tflops=6 * (N - N // 4) * H * V / statistics.median(times["fused"]) / 1e12,
               max_abs_error_vs_reference=err, peak_bytes=peaks.get("fused"),
               reference_peak_bytes=peaks.get("reference"), liger_error=liger_why)
    if liger is not None:
        row.update(liger_ms=statistics.median(times["liger"]) * 1e3, liger_peak_bytes=peaks.get("liger"),
                   vs_liger=ratio(times, "liger")[0], vs_liger_range=ratio(times, "liger")[1])
    return row


def print_linear_ce(rows) -> None:
    def mib(b):
        return "-" if b is None else f"{b / 2 ** 20:.0f} MiB"

    for r in rows:
        s = r["shape"]
        line = (f"linear_ce   tokens={s['tokens']},H={s['hidden']},V={s['vocab']} {r['dtype']:<9} {r['backend']:<8} "
                f"{r['median_ms']:>9.2f} ms  x reference {r['vs_reference']:.2f} "
                f"({r['vs_reference_range'][0]:.2f}-{r['vs_reference_range'][1]:.2f}) over {r['rounds']} rounds; "
                f"peak {mib(r['peak_bytes'])} vs {mib(r['reference_peak_bytes'])}")
        if "vs_liger" in r:
            line += (f"; x Liger {r['vs_liger']:.2f} ({r['vs_liger_range'][0]:.2f}-{r['vs_liger_range'][1]:.2f}), "
                     f"Liger peak {mib(r['liger_peak_bytes'])}")
        elif r.get("liger_error") and r["liger_error"] != "no peer on this device":
            line += f"; Liger: {r['liger_error']}"
        print(line)
