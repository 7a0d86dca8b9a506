"""``metareason bench kernels``: time the fused ops against their references, same run.

Per op and shape: median time of the dispatched backend, the eager PyTorch reference and
``torch.compile`` of that reference, effective GB/s and TFLOP/s, and the ratios. The fair
baselines are timed interleaved with the fused op (one call of each per round, so load on a
shared machine hits every column alike) and reported as the median ratio with its range over
the rounds: for lru_act an eager loop that keeps only the running rows each iteration
(``lru_act_eager_compact``: the masked reference does all max_iterations for every token); for
mla_decode one ``scaled_dot_product_attention`` call on a contiguous latent cache (heads folded
into query rows, keys = ``[latent | rope key]``, values = the latent) and the LRU model's own
absorbed batched-matmul path (``MLAAttention._absorbed``: baddbmm scores, fp32 softmax, bmm),
plus the naive decompress-then-attend path. Prints a table and writes
``bench/results/kernels-<device>.json`` with the device name, torch version and date.

How the lru_act halting mix is made realistic: w_p is scaled (×6) so tokens get different
halting probabilities, then b_p is chosen by bisection on the benchmark's own input so that
the mean ponder (mean num_iterations) is ≈ 3 of max 8; the table reports the mean and the
histogram of halting steps. FLOP counts are *useful* work (Σ_t n_t GEMM rows), the same for
every column, so TFLOP/s compare directly; the reference does N·max_iterations rows of it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from metareason import ops
from metareason.benchmarks import DEFAULT_OUT
from metareason.benchmarks.interleaved import interleaved, ratio
from metareason.benchmarks.kernels_linear_ce import bench_linear_ce, print_linear_ce
from metareason.ops import LRUParams
from metareason.ops.lru_act import lru_act_eager_compact, lru_act_reference
from metareason.ops.mla_decode import absorb_queries, mla_decode_reference, mla_decompress_attention


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to benchmark on")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for kernels-<device>.json (default: {DEFAULT_OUT})")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a shared machine use fewer threads "
                             "than free cores: OpenMP barriers with a descheduled thread dominate otherwise")
    parser.add_argument("--ops", default=None,
                        help="comma-separated subset of lru_act,mla_decode,linear_ce (default: lru_act,mla_decode on "
                             "the CPU, whose linear_ce figures come from bench/linear_ce_sanity.py; all three on CUDA, "
                             "linear_ce there with Liger-Kernel's fused linear cross-entropy as the peer when installed)")


def _dispatch_triton_ok(device: str) -> bool:
    from metareason.ops import _dispatch

    return _dispatch.triton_why_not(torch.device(device)) is None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from metareason.benchmarks import cpu_name

    return cpu_name()


def timeit(fn: Callable[[], object], device: str, repeats: int, budget_s: float = 30.0) -> float:
    """Median seconds of ``fn`` after one warm-up call; stops early past ``budget_s``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def _compiled(fn, enabled: bool):
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        print(f"[bench] torch.compile unavailable: {exc}")
        return None


def _measure_compiled(fn, device, repeats):
    if fn is None:
        return None, "disabled"
    try:
        return timeit(fn, device, repeats), None
    except Exception as exc:  # a compile failure is a result worth recording, not a crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


# ---------------------------------------------------------------- lru_act
def calibrate_halt_bias(x, params, max_iterations, threshold, target, backend):
    lo, hi = -8.0, 8.0
    with torch.no_grad():
        for _ in range(20):
            mid = (lo + hi) / 2
            p = params._replace(b_p=torch.tensor(mid, dtype=params.b_p.dtype, device=params.b_p.device))
            mean = ops.lru_act(x, p, max_iterations, threshold, backend=backend).num_iterations.float().mean().item()
            lo, hi = (mid, hi) if mean > target else (lo, mid)  # larger b_p -> earlier halting
    return params._replace(b_p=torch.tensor((lo + hi) / 2, dtype=params.b_p.dtype, device=params.b_p.device))


def bench_lru(n, d, M, dtype, device, repeats, use_compile, backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dtype=dtype, device=device)
    params = LRUParams.init(d, generator=g, dtype=dtype, device=device)
    params = params._replace(w_p=params.w_p * 6)
    thr = 0.99
    params = calibrate_halt_bias(x, params, M, thr, 3.0, backend)
    with torch.no_grad():
        res = ops.lru_act(x, params, M, thr, backend=backend)
    nit = res.num_iterations
    rows = int(nit.sum())
    esize = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * n * d * 3 * d + rows * (2 * d * 2 * d + 2 * d * d)  # U·x once + two GEMMs per active row
    nbytes = esize * (2 * n * d + 7 * d * d + 4 * d) + 4 * (2 * n * M + 2 * n)

    def fused():
        with torch.no_grad():
            return ops.lru_act(x, params, M, thr, backend=backend)

    def eager():
        with torch.no_grad():
            return lru_act_reference(x, params, M, thr)

    def eager_compact():
        with torch.no_grad():
            return lru_act_eager_compact(x, params, M, thr)

    comp = _compiled(lru_act_reference, use_compile)

    def compiled():
        with torch.no_grad():
            return comp(x, params, M, thr)

    times = interleaved(dict(fused=fused, eager=eager, eager_compact=eager_compact), device, repeats)
    t_f, t_e, t_k = (statistics.median(times[k]) for k in ("fused", "eager", "eager_compact"))
    vs_e, vs_e_range = ratio(times, "eager")
    vs_k, vs_k_range = ratio(times, "eager_compact")
    t_c, c_err = _measure_compiled(compiled if comp else None, device, repeats)
    return dict(
        op="lru_act",
        shape=dict(tokens=n, d=d, max_iterations=M, threshold=thr),
        dtype=str(dtype).replace("torch.", ""),
        backend=backend,
        mean_ponder=round(nit.float().mean().item(), 3),
        halting_histogram=torch.bincount(nit.cpu(), minlength=M + 1)[1:].tolist(),
        b_p=round(float(params.b_p), 4),
        rounds=len(times["fused"]),
        median_ms=t_f * 1e3,
        eager_ms=t_e * 1e3,
        eager_compact_ms=t_k * 1e3,
        compile_ms=None if t_c is None else t_c * 1e3,
        compile_error=c_err,
        gbps=nbytes / t_f / 1e9,
        tflops=flops / t_f / 1e12,
        vs_eager=vs_e,
        vs_eager_range=vs_e_range,
        vs_eager_compact=vs_k,
        vs_eager_compact_range=vs_k_range,
        vs_compile=None if t_c is None else t_c / t_f,
    )


# ---------------------------------------------------------------- machine limits
def bench_machine(device: str, repeats: int, mbytes: int = 256) -> dict:
    """The roofline of this run: copy bandwidth (bytes read + written per second, ``mbytes`` MB
    buffers, far past the caches) and the GFLOP/s of a large fp32 matmul, measured in the same
    process as the ops so a loaded machine shows in both."""
    n = mbytes * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t_copy = timeit(lambda: dst.copy_(src), device, repeats)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    t_mm = timeit(lambda: a @ b, device, repeats)
    return dict(copy_gbps=2 * n * 4 / t_copy / 1e9, copy_mbytes=mbytes,
                sgemm_gflops=2 * 2048 ** 3 / t_mm / 1e9, sgemm_shape=[2048, 2048, 2048])


# ---------------------------------------------------------------- mla_decode
def bench_mla(B, S, H, d_c, d_rope, dtype, device, repeats, use_compile, backend, d_nope=128, d_v=128):
    g = torch.Generator().manual_seed(0)
    D = d_c + d_rope
    nblk = (S + 63) // 64
    cache = torch.randn(B * nblk, 64, 1, D, generator=g).to(dtype=dtype, device=device)
    table = torch.randperm(B * nblk, generator=g).view(B, nblk).int().to(device)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    q_nope = torch.randn(B, H, d_nope, generator=g).to(dtype=dtype, device=device)
    q_rope = torch.randn(B, H, d_rope, generator=g).to(dtype=dtype, device=device)
    W_uk = (torch.randn(H, d_c, d_nope, generator=g) / d_c ** 0.5).to(dtype=dtype, device=device)
    W_uv = (torch.randn(H, d_c, d_v, generator=g) / d_c ** 0.5).to(dtype=dtype, device=device)
    q = absorb_queries(q_nope, q_rope, W_uk)[:, None].contiguous()
    scale = (d_nope + d_rope) ** -0.5
    # the naive path keeps the latent per sequence ([B, S, d_c] + rope), decompressing every step
    rows = cache[table.long()].reshape(B, nblk * 64, D)[:, :S]
    c_kv, k_rope = rows[..., :d_c].contiguous(), rows[..., d_c:].contiguous()

    def fused():
        return ops.mla_decode(q, cache, table, lens, d_c, scale, backend=backend)

    def eager():
        return mla_decode_reference(q, cache, table, lens, d_c, scale)

    def naive():
        return mla_decompress_attention(q_nope, q_rope, c_kv, k_rope, W_uk, W_uv, scale)

    q_rows = q.view(B, 1, H, D)  # heads folded into query rows: one latent key/value head
    q_lat, q_rp = q.view(B, H, D).split([d_c, d_rope], dim=-1)

    def sdpa_latent():
        return torch.nn.functional.scaled_dot_product_attention(
            q_rows, rows[:, None], rows[:, None, :, :d_c], scale=scale).view(B, H, d_c)

    def absorbed_bmm():  # MLAAttention._absorbed for one query position
        scores = torch.baddbmm(q_rp @ k_rope.transpose(1, 2), q_lat, c_kv.transpose(1, 2)) * scale
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        return torch.bmm(weights, c_kv)

    comp = _compiled(mla_decode_reference, use_compile)

    def compiled():
        return comp(q, cache, table, lens, d_c, scale)

    rows = rows.contiguous()
    with torch.no_grad():
        got = fused()[0].view(B, H, d_c).float()
        tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-3)
        for name, fn in (("sdpa_latent", sdpa_latent), ("absorbed_bmm", absorbed_bmm)):
            torch.testing.assert_close(fn().float(), got, **tol, msg=f"mla_decode baseline {name}")
        times = interleaved(dict(fused=fused, eager=eager, sdpa_latent=sdpa_latent, absorbed_bmm=absorbed_bmm),
                            device, repeats)
        t_f, t_e, t_s, t_b = (statistics.median(times[k]) for k in ("fused", "eager", "sdpa_latent", "absorbed_bmm"))
        t_n = timeit(naive, device, max(3, repeats // 2))
        t_c, c_err = _measure_compiled(compiled if comp else None, device, repeats)
    esize = cache.element_size()
    nbytes = esize * (B * S * D + B * H * D + B * H * d_c)
    flops = 2 * B * H * S * (D + d_c)
    return dict(
        op="mla_decode",
        shape=dict(B=B, seqlen=S, H=H, d_c=d_c, d_rope=d_rope, s_q=1),
        dtype=str(dtype).replace("torch.", ""),
        backend=backend,
        rounds=len(times["fused"]),
        median_ms=t_f * 1e3,
        eager_ms=t_e * 1e3,
        sdpa_latent_ms=t_s * 1e3,
        absorbed_bmm_ms=t_b * 1e3,
        compile_ms=None if t_c is None else t_c * 1e3,
        compile_error=c_err,
        naive_decompress_ms=t_n * 1e3,
        gbps=nbytes / t_f / 1e9,
        tflops=flops / t_f / 1e12,
        vs_eager=ratio(times, "eager")[0],
        vs_eager_range=ratio(times, "eager")[1],
        vs_sdpa_latent=ratio(times, "sdpa_latent")[0],
        vs_sdpa_latent_range=ratio(times, "sdpa_latent")[1],
        vs_absorbed_bmm=ratio(times, "absorbed_bmm")[0],
        vs_absorbed_bmm_range=ratio(times, "absorbed_bmm")[1],
        vs_compile=None if t_c is None else t_c / t_f,
        vs_naive_decompress=t_n / t_f,
    )


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    head = f"{'op':<11} {'shape':<44} {'dtype':<9} {'backend':<8} {'ms':>9} {'GB/s':>7} {'TFLOP/s':>8} " \
           f"{'xEager':>7} {'xCompile':>8} {'xNaive':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k != "threshold")
        print(f"{r['op']:<11} {shape:<44} {r['dtype']:<9} {r['backend']:<8} {r['median_ms']:>9.2f} "
              f"{r['gbps']:>7.2f} {r['tflops']:>8.4f} {_fmt(r['vs_eager']):>7} {_fmt(r['vs_compile']):>8} "
              f"{_fmt(r.get('vs_naive_decompress')):>7}")
        fair = [(label, r[key], r[key + "_range"]) for label, key in
                (("eager, running rows only", "vs_eager_compact"), ("one SDPA call, contiguous latent", "vs_sdpa_latent"),
                 ("model's absorbed bmm", "vs_absorbed_bmm")) if key in r]
        print(f"{'':<11} x fair baselines over {r['rounds']} interleaved rounds: " + "; ".join(
            f"{label} {v:.2f} ({lo:.2f}-{hi:.2f})" for label, v, (lo, hi) in fair))
        if r["op"] == "lru_act":
            print(f"{'':<11} mean ponder {r['mean_ponder']}, halting steps 1..{len(r['halting_histogram'])}: "
                  f"{r['halting_histogram']}")
        if r.get("compile_error"):
            print(f"{'':<11} torch.compile: {r['compile_error']}")


def run(args: argparse.Namespace) -> int:
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if device == "cuda" and not torch.cuda.is_available():
        print("bench kernels: --device cuda, but torch.cuda.is_available() is False on this machine")
        return 2
    known = ("lru_act", "mla_decode", "linear_ce")
    selected = [o.strip() for o in (args.ops or "").split(",") if o.strip()] or \
        (list(known) if device == "cuda" else ["lru_act", "mla_decode"])
    bad = [o for o in selected if o not in known]
    if bad:
        print(f"bench kernels: --ops: unknown op {bad[0]!r}; expected some of {', '.join(known)}")
        return 2
    backend = "cuda" if device == "cuda" else ("cpu" if "cpu" in ops.available_backends() else "reference")
    repeats = args.repeats or (3 if args.quick else 7)
    use_compile = not args.no_compile
    if args.quick:
        lru_shapes = [(512, 128, 8)]
        mla_shapes = [(2, 512, 16, 128, 32)]
        ce_shapes = [(256, 64, 1000)]
    else:
        # SmolLM2-135M's output layer (H 576, V 49,152): 2 x 512 tokens on the CPU, 8 x 512 on a GPU
        ce_shapes = [(1024, 576, 49152)] if device == "cpu" else [(4096, 576, 49152), (8192, 576, 49152)]
        lru_shapes = [(4096, 512, 8), (1024, 256, 8)]
        mla_shapes = [(4, 4096, 16, 512, 64), (1, 4096, 16, 512, 64)] if device == "cpu" else \
            [(64, 4096, 16, 512, 64), (4, 4096, 16, 512, 64)]
    mla_dtypes = [torch.float32, torch.bfloat16]
    rows = []
    print("[bench] machine: copy bandwidth and sgemm ...", flush=True)
    machine = bench_machine(device, repeats, 64 if args.quick else 256)
    fused = [backend]
    if device == "cuda":  # both GPU implementations, each against the same references
        from metareason.ops import _dispatch

        fused = [b for b, why in (("cuda", None if "cuda" in ops.available_backends() else "no CUDA ext"),
                                  ("triton", _dispatch.triton_why_not(torch.device("cuda")))) if why is None]
    lru_shapes = lru_shapes if "lru_act" in selected else []
    mla_shapes = mla_shapes if "mla_decode" in selected else []
    ce_shapes = ce_shapes if "linear_ce" in selected else []
    for n, d, M in lru_shapes:
        for be in fused:
            print(f"[bench] lru_act tokens={n} d={d} max_iterations={M} ({be}) ...", flush=True)
            rows.append(bench_lru(n, d, M, torch.float32, device, repeats, use_compile, be))
    for B, S, H, d_c, d_rope in mla_shapes:
        for dt in mla_dtypes:
            for be in fused:
                print(f"[bench] mla_decode B={B} S={S} H={H} {dt} ({be}) ...", flush=True)
                row = bench_mla(B, S, H, d_c, d_rope, dt, device, repeats, use_compile, be)
                # the op streams its cache once: copy bandwidth is its physical limit
                row["frac_copy_bw"] = row["gbps"] / machine["copy_gbps"]
                row["frac_sgemm"] = row["tflops"] * 1e3 / machine["sgemm_gflops"]
                rows.append(row)
    ce_backends = [backend] if device == "cpu" else \
        [b for b in ("cuda", "triton") if b == "cuda" or _dispatch_triton_ok(device)]
    ce_rows = []
    for N, H, V in ce_shapes:
        for dt in ([torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]):
            for be in ce_backends:
                print(f"[bench] linear_ce tokens={N} H={H} V={V} {dt} ({be}) ...", flush=True)
                ce_rows.append(bench_linear_ce(N, H, V, dt, device, repeats, "cpu" if be == "reference" else be,
                                               peer=device == "cuda"))
    print()
    print_table(rows)
    print_linear_ce(ce_rows)
    rows += ce_rows
    print(f"\nmachine: copy {machine['copy_gbps']:.1f} GB/s (read + write), sgemm {machine['sgemm_gflops']:.0f} GFLOP/s")
    for r in rows:
        if r["op"] == "mla_decode":
            print(f"mla_decode B={r['shape']['B']} {r['dtype']} {r['backend']}: {r['gbps']:.1f} GB/s = {r['frac_copy_bw']:.2f} of copy, "
                  f"{r['tflops'] * 1e3:.0f} GFLOP/s = {r['frac_sgemm']:.2f} of sgemm, {r['vs_eager']:.2f}x eager")
    result = dict(
        device=device_name(device),
        device_type=device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        loadavg_1m_before=None if load_before is None else round(load_before[0], 2),
        loadavg_1m_after=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        quick=bool(args.quick),
        backends=ops.available_backends(),
        machine=machine,
        command="metareason bench kernels " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in sorted(vars(args).items())
            if k in ("device", "quick", "threads", "repeats", "no_compile", "ops") and v not in (None, False)),
        rows=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{device}{'-quick' if args.quick else ''}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
