"""``metareason bench serve``: what dynamic batching buys a served model.

The same N greedy requests (causal-loop prompts, ``max_tokens`` each) are answered
1. one after another by the kernel's local generation in this process (the baseline), then
2. by ``metareason serve`` in a subprocess, through the official ``openai`` client with 1, 8 and
   32 requests in flight.
Requests/s and completion tokens/s of each, and the speed-up over the baseline, are written to
``bench/results/serve-<device>.json`` and ``.md``. Client and server share the machine, as they
would on a one-box deployment; the default model is the quickstart architecture (random init,
so completion lengths vary but are the same for every side: greedy decoding of the same prompts).
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from metareason.benchmarks import cpu_name, write_record

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model or run directory (default: the quickstart architecture, random init)")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32", help="comma list of requests in flight")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="default: bench/results/serve-<device>.json")


def _quickstart_model(path: Path) -> Path:
    import torch

    from metareason.kernel import Kernel

    torch.manual_seed(0)
    kernel = Kernel(QUICKSTART, overrides=["quiet=true", "model.device=cpu"])
    model, tokenizer = kernel.load()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _prompts(n: int) -> list[str]:
    from metareason.data.causal_loop import make_task

    task = make_task({"levels": [1, 2], "split": "test"}, 99, n)
    return [task[i]["prompt"] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"metareason serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("metareason serve did not come up")


def _row(name: str, wall: float, requests: int, tokens: int, baseline: float | None) -> dict:
    rps = requests / wall
    return {"side": name, "wall_s": round(wall, 3), "requests": requests, "completion_tokens": tokens,
            "requests_per_s": round(rps, 3), "completion_tokens_per_s": round(tokens / wall, 1),
            "speedup_vs_sequential_local": round(rps / baseline, 2) if baseline else 1.0}


def run(args: argparse.Namespace) -> int:
    import openai
    import torch

    from metareason.generators.local import LocalGenerator, load_local_model

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"bench/results/serve-{device}.json")
    prompts = _prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else _quickstart_model(Path(tmp) / "model")
        model, tokenizer, _, fmt = load_local_model(str(model_dir), device=device)
        local = LocalGenerator(model, tokenizer, batch_size=1, fmt=fmt)
        local.generate(prompts[:2], max_new_tokens=args.max_tokens)  # warm-up
        t0 = time.perf_counter()
        seq = [local.generate([p], max_new_tokens=args.max_tokens)[0] for p in prompts]
        base_wall = time.perf_counter() - t0
        base_tokens = sum(c.completion_tokens for c in seq)
        rows = [_row("local, sequential", base_wall, len(prompts), base_tokens, None)]
        print(f"[bench serve] local sequential: {rows[0]['requests_per_s']} req/s", file=sys.stderr)
        baseline = rows[0]["requests_per_s"]
        del local, model

        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "metareason", "serve", str(model_dir), "--port", str(port),
                                 "--model-name", "bench", "--max-batch-size", str(args.max_batch_size),
                                 "--batch-window-ms", str(args.batch_window_ms), "--device", device],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mismatches = 0
        try:
            _wait_up(base, proc)
            client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

            def ask(p):
                r = client.completions.create(model="bench", prompt=p, max_tokens=args.max_tokens, temperature=0)
                return r.choices[0].text, r.usage.completion_tokens

            ask(prompts[0])  # warm-up
            for c in levels:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    answers = list(pool.map(ask, prompts))
                wall = time.perf_counter() - t0
                mismatches += sum(a[0] != s.text for a, s in zip(answers, seq))
                rows.append(_row(f"serve, concurrency {c}", wall, len(prompts), sum(a[1] for a in answers), baseline))
                print(f"[bench serve] concurrency {c}: {rows[-1]['requests_per_s']} req/s "
                      f"({rows[-1]['speedup_vs_sequential_local']}x)", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(60)
    record = {
        "benchmark": "serve", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "model": str(args.model) if args.model else "quickstart architecture (random init)",
        "requests": args.requests, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
        "batch_window_ms": args.batch_window_ms,
        "greedy_texts_differing_from_local": mismatches, "rows": rows,
        "command": " ".join(["metareason bench serve"] + (sys.argv[3:] if sys.argv[1:3] == ["bench", "serve"] else [])),
    }
    write_record(out, record, _markdown(record))
    return 0


def _markdown(r: dict) -> str:
    lines = [
        "# `metareason bench serve`", "",
        f"{r['date']} · {r['device']} · {r['cpus']} CPUs · torch {r['torch']}", "",
        f"{r['requests']} greedy requests (causal-loop prompts), max_tokens {r['max_tokens']}, model: {r['model']}; "
        f"server batch {r['max_batch_size']}, window {r['batch_window_ms']:g} ms. Client and server on the same "
        "machine.", "",
        f"Command: `{r['command']}`", "",
        "| side | wall s | req/s | completion tok/s | speed-up vs sequential local |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['side']} | {row['wall_s']} | {row['requests_per_s']} | {row['completion_tokens_per_s']} "
                     f"| {row['speedup_vs_sequential_local']}x |")
    lines += ["", f"Served greedy texts that differ from the local ones (all concurrency levels): "
                  f"{r['greedy_texts_differing_from_local']} (batched fp32 matmuls may flip near-ties).", ""]
    return "\n".join(lines)
