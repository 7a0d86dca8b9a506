"""``metareason bench serve``: continuous batching against static batching (and, optionally,
``transformers serve --continuous-batching``) on the same model and requests.

The requests are chat questions of mixed prompt lengths with mixed ``max_tokens`` (16 to 128),
greedy, ending naturally (EOS) or at their budget. Each side answers them at 1, 8, 32 and 64
requests in flight (``--requests``: how many, one count or one per level; every side gets the same
first requests of the list), ``--repeats`` times, interleaved:

* ``continuous``: ``metareason serve`` in a subprocess, through the ``openai`` client, streaming;
* ``static``: this project's earlier engine (:class:`metareason.generators.batching.BatchingEngine`:
  requests with equal parameters batched for a 10 ms window, each batch run to its end), driven in
  this process with no HTTP in between (which favours it), answers arriving only at the end;
* ``transformers``: ``transformers serve MODEL --continuous-batching`` (``--sides ...,transformers``), if it
  comes up and answers; a side that fails is recorded as failed, not dropped.

Every side is started (and warmed up with one request) first; then each level is measured on each
side in turn, the order alternating between levels, so a machine shared with other work loads the
sides alike (the 1-minute load average is recorded after each measurement).
Per side and level: requests/s, completion tokens/s, time to first token and per-token latency
(time between streamed tokens; for the static side the whole latency over the tokens) p50/p99.
Written to ``--out`` (default ``bench-results/serve-<device>.json``) and ``.md`` beside it. Client
and server share the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from metareason.benchmarks import DEFAULT_OUT, cpu_name, write_record

TOPICS = ["the sea", "a mountain", "bread", "a library", "rain", "a bicycle", "chess", "the moon"]
MAX_TOKENS = [16, 32, 64, 128]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a model directory, or a name `metareason models get` knows "
                             "(default SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", default="64",
                        help="requests per measurement: one number, or a comma list with one per --concurrency level "
                             "(e.g. 16,32,64,64: fewer where few are in flight)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma list of requests in flight")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--sides", default="continuous,static", help="comma list of continuous, static, transformers")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request before a side is failed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measurements of every (side, level), interleaved; rows give the median and the range, "
                             "and the ratios to the first side are paired by repeat (default 1)")
    parser.add_argument("--out", default=None,
                        help=f"JSON record (and .md beside it); default: {DEFAULT_OUT}/serve-<device>.json")


def requests_for(n: int) -> list[tuple[list[dict], int]]:
    """``n`` chat requests: prompts of 1 to 8 sentences of context, max_tokens 16..128."""
    out = []
    for i in range(n):
        context = " ".join(f"Fact {k}: {TOPICS[(i + k) % len(TOPICS)]} is worth a thought." for k in range(1 + i % 8))
        question = f"{context} Write about {TOPICS[i % len(TOPICS)]} in a few sentences."
        out.append(([{"role": "user", "content": question}], MAX_TOKENS[(i * 3) % len(MAX_TOKENS)]))
    return out


def per_level_requests(spec: str, levels: list[int]) -> dict[int, int]:
    """``--requests``: one count for every level, or one per level in ``--concurrency``'s order."""
    from metareason.errors import UserError

    try:
        counts = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--requests: {spec!r} is not a number or a comma list of numbers") from None
    if len(counts) == 1:
        counts = counts * len(levels)
    if len(counts) != len(levels):
        raise UserError(f"--requests: {len(counts)} counts for {len(levels)} --concurrency levels")
    if min(counts) < 1:
        raise UserError(f"--requests: {spec!r} (every count must be at least 1)")
    return dict(zip(levels, counts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _row(side: str, c: int, wall: float, answers: list[dict]) -> dict:
    tokens = sum(a["tokens"] for a in answers)
    ttft = [a["ttft"] for a in answers]
    gaps = [g for a in answers for g in a["gaps"]]
    ms = lambda x: round(1000 * x, 1)  # noqa: E731
    return {"side": side, "concurrency": c, "wall_s": round(wall, 2), "requests": len(answers),
            "completion_tokens": tokens, "requests_per_s": round(len(answers) / wall, 3),
            "completion_tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": ms(_pct(ttft, 0.5)),
            "ttft_p99_ms": ms(_pct(ttft, 0.99)), "token_latency_p50_ms": ms(_pct(gaps, 0.5)),
            "token_latency_p99_ms": ms(_pct(gaps, 0.99))}


def _streaming_client(base: str, model: str, timeout: float):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=timeout)

    def ask(req):
        messages, max_tokens = req
        t0 = time.perf_counter()
        stamps, text, tokens = [], "", None
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
                text += chunk.choices[0].delta.content
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
        ttft = (stamps[0] if stamps else time.perf_counter()) - t0
        return {"ttft": ttft, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                "tokens": tokens if tokens is not None else len(stamps), "text": text}
    return ask


def _level(side: str, ask, reqs, c: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        answers = list(pool.map(ask, reqs))
    row = _row(side, c, time.perf_counter() - t0, answers)
    print(f"[bench serve] {side} x{c}: {row['requests_per_s']} req/s, {row['completion_tokens_per_s']} tok/s, "
          f"ttft p99 {row['ttft_p99_ms']} ms (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return row


def _within(seconds: float, fn, *args):
    """``fn(*args)`` in a daemon thread; raises ``TimeoutError`` when it has not returned in time
    (the thread is left behind: a side that hangs is recorded as failed, the others go on)."""
    result: dict = {}

    def work():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc
    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    if "error" in result:
        raise result["error"]
    if "value" not in result:
        raise TimeoutError(f"no answer within {seconds:g} s")
    return result["value"]


@contextmanager
def _continuous(model_dir: Path, device: str, args):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "metareason", "serve", str(model_dir), "--port", str(port),
                             "--model-name", "bench", "--max-batch-size", str(args.max_batch_size),
                             "--max-queue", "4096", "--max-tokens-in-flight", str(10 ** 7), "--device", device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(base, proc)
        yield _streaming_client(base, "bench", args.timeout)
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def _static(model_dir: Path, device: str, args):
    from metareason.generators.batching import BatchingEngine, Request
    from metareason.generators.local import LocalGenerator, load_local_model

    model, tokenizer, _, fmt = load_local_model(str(model_dir), device=device)
    engine = BatchingEngine(LocalGenerator(model, tokenizer, batch_size=args.max_batch_size, fmt=fmt),
                            max_batch=args.max_batch_size, window_s=0.01, max_queue=4096)

    def ask(req):
        messages, max_tokens = req
        t0 = time.perf_counter()
        (c,) = engine.submit(Request(prompts=[messages], max_new_tokens=max_tokens, temperature=0.0)).result()
        wall = time.perf_counter() - t0
        return {"ttft": wall, "gaps": [wall / max(c.completion_tokens, 1)] * max(c.completion_tokens - 1, 0),
                "tokens": c.completion_tokens, "text": c.text}
    try:
        yield ask
    finally:
        engine.stop(5)


def _transformers_cli() -> str:
    """The ``transformers`` command of this interpreter's environment (a venv used without being
    activated has it beside ``sys.executable``, not on PATH), else the one on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "transformers"
    if beside.exists():
        return str(beside)
    found = shutil.which("transformers")
    if found is None:
        raise FileNotFoundError("the `transformers` command (pip install 'transformers[serving]')")
    return found


@contextmanager
def _transformers(model_dir: Path, device: str, args):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([_transformers_cli(), "serve", str(model_dir), "--continuous-batching", "--port", str(port),
                             "--device", device, "--dtype", "float32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(base, proc)
        yield _streaming_client(base, str(model_dir), args.timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


SIDES = {"continuous": ("continuous (metareason serve)", _continuous),
         "static": ("static (earlier engine, in-process)", _static),
         "transformers": ("transformers serve --continuous-batching", _transformers)}


def run(args: argparse.Namespace) -> int:
    """Every side is started first, then each level is measured on each side in turn (the
    order alternating between levels), so the sides share whatever else loads the machine."""
    import torch

    from metareason.errors import UserError

    if args.repeats < 1:
        raise UserError(f"--repeats: {args.repeats} (must be at least 1)")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    counts = per_level_requests(args.requests, levels)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for s in sides:
        if s not in SIDES:
            raise UserError(f"--sides: unknown side {s!r} (one of {', '.join(SIDES)})")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        from metareason.models.pretrained import ensure_model

        model_dir = Path(ensure_model(args.model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"{DEFAULT_OUT}/serve-{device}.json")
    all_reqs = requests_for(max(counts.values()))
    rows, failures, asks = [], {}, {}
    load = [round(os.getloadavg()[0], 2)]
    with ExitStack() as stack:
        for side in sides:
            try:
                ask = stack.enter_context(SIDES[side][1](model_dir, device, args))
                _within(args.timeout, ask, all_reqs[0])  # warm-up
                asks[side] = ask
            except Exception as exc:  # noqa: BLE001 - recorded, the other sides still run
                failures[side] = f"{type(exc).__name__}: {exc}"
                print(f"[bench serve] {side} failed: {failures[side]}", file=sys.stderr, flush=True)
        turn = 0
        for rep in range(args.repeats):
            for c in levels:
                for side in (sides if turn % 2 == 0 else sides[::-1]):
                    if side not in asks:
                        continue
                    try:
                        reqs = all_reqs[:counts[c]]  # the same first requests on every side
                        row = _within(args.timeout * max(1, -(-len(reqs) // c)), _level, SIDES[side][0],
                                      asks[side], reqs, c)
                        rows.append(dict(row, repeat=rep))
                    except Exception as exc:  # noqa: BLE001
                        failures[side] = f"at {c} in flight: {type(exc).__name__}: {exc}"
                        print(f"[bench serve] {side} failed: {failures[side]}", file=sys.stderr, flush=True)
                        del asks[side]
                    load.append(round(os.getloadavg()[0], 2))
                turn += 1
    order = [SIDES[s][0] for s in sides]
    rows.sort(key=lambda r: (order.index(r["side"]), r["concurrency"], r["repeat"]))
    summary = summarise(rows, order)
    record = {
        "benchmark": "serve", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "model": args.model, "requests": counts, "max_tokens": MAX_TOKENS,
        "max_batch_size": args.max_batch_size, "repeats": args.repeats, "rows": rows, "summary": summary["rows"],
        "ratios": summary["ratios"], "failed_sides": failures,
        "load_average_1min": load, "interleaved": True,
        "command": " ".join(["metareason bench serve"] + (sys.argv[3:] if sys.argv[1:3] == ["bench", "serve"] else [])),
    }
    write_record(out, record, _markdown(record))
    return 0


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


SUMMARY_KEYS = ("requests_per_s", "completion_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
                "token_latency_p50_ms", "token_latency_p99_ms")


def summarise(rows: list[dict], order: list[str]) -> dict:
    """Per (side, level): the median of each figure over the repeats and its range; per level and
    side after the first: the first side's throughput over that side's, paired by repeat (each
    ratio from two measurements taken one after the other), as median and range."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["side"], r["concurrency"]), []).append(r)
    out = []
    for (side, c), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        row = {"side": side, "concurrency": c, "repeats": len(rs)}
        for k in SUMMARY_KEYS:
            vals = [x[k] for x in rs]
            row[k] = round(_median(vals), 3)
            row[f"{k}_range"] = [min(vals), max(vals)]
        out.append(row)
    ratios = []
    first = order[0]
    for other in order[1:]:
        for c in sorted({r["concurrency"] for r in rows}):
            mine = {r["repeat"]: r["requests_per_s"] for r in groups.get((first, c), [])}
            theirs = {r["repeat"]: r["requests_per_s"] for r in groups.get((other, c), [])}
            per = [mine[k] / theirs[k] for k in sorted(mine) if k in theirs and theirs[k] > 0]
            if per:
                ratios.append({"side": first, "vs": other, "concurrency": c, "per_repeat": [round(x, 3) for x in per],
                               "median": round(_median(per), 3), "min": round(min(per), 3), "max": round(max(per), 3)})
    return {"rows": out, "ratios": ratios}


def _requests_text(requests) -> str:
    if isinstance(requests, int):  # records written before per-level counts
        return str(requests)
    counts = set(requests.values())
    if len(counts) == 1:
        return str(counts.pop())
    return "(" + ", ".join(f"{n} at {c} in flight" for c, n in requests.items()) + ")"


def _markdown(r: dict) -> str:
    lines = [
        "# `metareason bench serve`", "",
        f"{r['date']} · {r['device']} · {r['cpus']} CPUs · torch {r['torch']}", "",
        f"{_requests_text(r['requests'])} greedy chat requests of mixed prompt lengths, max_tokens cycling through "
        f"{r['max_tokens']} (most end at EOS first), model {r['model']}; batch {r['max_batch_size']}. "
        "Client and server on the same machine. Time to first token (TTFT) and per-token latency are "
        "percentiles over requests and streamed tokens; the static side does not stream, so its TTFT is the "
        "whole latency and its per-token latency the latency over the tokens.", "",
        "The sides are measured interleaved: each level on each side in turn, the order alternating "
        f"between levels. 1-minute load average over the run: {', '.join(map(str, r.get('load_average_1min', [])))}.",
        "", f"Command: `{r['command']}`", "",
        "| side | in flight | req/s | completion tok/s | TTFT p50 / p99 ms | per-token p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    repeats = r.get("repeats", 1)
    if repeats > 1:
        lines[-2:] = [f"Each (side, level) measured {repeats} times; the figures are medians over the repeats, "
                      "requests/s with its range.", "",
                      "| side | in flight | req/s (range) | completion tok/s | TTFT p50 / p99 ms | per-token p50 / p99 ms |",
                      "|---|---|---|---|---|---|"]
    for row in (r["summary"] if repeats > 1 else r["rows"]):
        rng = (f" ({row['requests_per_s_range'][0]}–{row['requests_per_s_range'][1]})" if repeats > 1 else "")
        lines.append(f"| {row['side']} | {row['concurrency']} | {row['requests_per_s']}{rng} | "
                     f"{row['completion_tokens_per_s']} | {row['ttft_p50_ms']} / {row['ttft_p99_ms']} | "
                     f"{row['token_latency_p50_ms']} / {row['token_latency_p99_ms']} |")
    if r.get("ratios"):
        lines += ["", "Throughput ratio (requests/s), paired by repeat:", "",
                  "| side | vs | in flight | median | range | per repeat |", "|---|---|---|---|---|---|"]
        for x in r["ratios"]:
            lines.append(f"| {x['side']} | {x['vs']} | {x['concurrency']} | {x['median']}x | {x['min']}–{x['max']}x | "
                         f"{', '.join(map(str, x['per_repeat']))} |")
    for side, why in r["failed_sides"].items():
        lines.append(f"\n{side}: failed ({why}).")
    lines.append("")
    return "\n".join(lines)
