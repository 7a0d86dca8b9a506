"""``metareason data generate TASK``: write a task's examples to JSONL or parquet.

    metareason data generate causal_loop --levels 1,2,3,4 --num-samples 100000 --out data/cl
    metareason data generate reasoning_gym/leg_counting --num-samples 1000 --out data/rg \\
        --param min_animals=3 --format parquet

The file is ``OUT/<task>.<jsonl|parquet>`` (``/`` in the task name becomes ``_``; ``--name``
overrides the stem), one example per line/row with the task's fields (``id``, ``prompt``,
``completion``, ``answer``, ``group`` and task-specific ones). It is written to a temporary
file in ``OUT`` and renamed into place when complete, so a reader never sees half a file.
``causal_loop`` is generated in vectorised chunks; any other registered task (plugins'
included) is built through the kernel's task registry and written example by example.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from metareason.data.base import TaskError
from metareason.durable import atomic_file

CHUNK = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="a registered task: causal_loop, jsonl, reasoning_gym/<name>, ...")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--num-samples", type=int, default=100_000, help="examples to write (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    parser.add_argument("--levels", help="causal_loop levels, e.g. 1,2,3,4 (default: all)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a task parameter (YAML value), repeatable: --param split=train")
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--name", help="file stem (default: the task name with / replaced by _)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TaskError(f"--param {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        params[key.strip()] = value
    return params


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (its directory created); it replaces ``path`` on
    success only (:func:`metareason.durable.atomic_file`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp:
        yield str(tmp)


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="samples", unit_scale=True, desc=desc, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


# ------------------------------------------------------------------------------ causal loop
_SAFE = re.compile(r'["\\\x00-\x1f]')


def causal_loop_chunks(cfg, seed: int, num_samples: int, chunk: int = CHUNK) -> Iterator[tuple[int, dict]]:
    from metareason.data.causal_loop import generate_columns

    for start in range(0, num_samples, chunk):
        yield start, generate_columns(cfg, seed, start, min(num_samples, start + chunk))


def causal_loop_jsonl_lines(cols: dict, seed: int, start: int) -> list[str]:
    """JSON lines of a chunk of columns, equal to ``json.dumps(example, separators=(",", ":"))``.

    The texts use a tiny alphabet (no quote, backslash or control character; checked) so they
    are written without escaping.
    """
    prompts, comps, answers = cols["prompt"], cols["completion"], cols["answer"]
    levels, rounds = cols["level"].tolist(), cols["rounds"].tolist()
    if _SAFE.search("".join(prompts)) or _SAFE.search("".join(comps)):  # pragma: no cover
        return [json.dumps(_example(seed, start + i, p, c, a, lv, r), separators=(",", ":"))
                for i, (p, c, a, lv, r) in enumerate(zip(prompts, comps, answers, levels, rounds))]
    head = f'{{"id":"causal_loop/{seed}/'
    plain = head + '%d","prompt":"%s","completion":"%s","answer":"%s","group":"level_%d","level":%d}\n'
    loop = head + '%d","prompt":"%s","completion":"%s","answer":"%s","group":"level_%d","level":%d,"rounds":%d}\n'
    return [(loop % (start + i, p, c, a, lv, lv, r)) if lv == 2 or lv == 4 else
            (plain % (start + i, p, c, a, lv, lv))
            for i, (p, c, a, lv, r) in enumerate(zip(prompts, comps, answers, levels, rounds))]


def _example(seed, i, p, c, a, lv, r) -> dict:
    ex = {"id": f"causal_loop/{seed}/{i}", "prompt": p, "completion": c, "answer": a,
          "group": f"level_{lv}", "level": lv}
    if lv in (2, 4):
        ex["rounds"] = r
    return ex


def write_causal_loop(cfg, seed: int, num_samples: int, path: str, fmt: str = "jsonl",
                      on_chunk: Optional[Callable[[int], None]] = None) -> int:
    """Write examples ``0..num_samples-1`` to ``path`` atomically; returns bytes written."""
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for start, cols in causal_loop_chunks(cfg, seed, num_samples):
                    f.write("".join(causal_loop_jsonl_lines(cols, seed, start)))
                    if on_chunk:
                        on_chunk(len(cols["prompt"]))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                                ("answer", pa.string()), ("group", pa.string()), ("level", pa.int8()),
                                ("rounds", pa.int16())])
            with pq.ParquetWriter(tmp, schema) as writer:
                for start, cols in causal_loop_chunks(cfg, seed, num_samples):
                    n = len(cols["prompt"])
                    levels = cols["level"]
                    is_loop = (levels == 2) | (levels == 4)
                    table = pa.table({
                        "id": [f"causal_loop/{seed}/{start + i}" for i in range(n)],
                        "prompt": cols["prompt"], "completion": cols["completion"], "answer": cols["answer"],
                        "group": [f"level_{lv}" for lv in levels.tolist()],
                        "level": pa.array(levels, pa.int8()),
                        "rounds": pa.array(cols["rounds"], pa.int16(), mask=~is_loop),
                    }, schema=schema)
                    writer.write_table(table)
                    if on_chunk:
                        on_chunk(n)
    return os.path.getsize(path)


# ------------------------------------------------------------------------------ any task
def build_task(task: str, params: dict, seed: int, num_samples: int):
    from metareason.kernel import Kernel

    factory, extra = Kernel().tasks.lookup(task)
    return factory(dict(params, **extra), seed, num_samples)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_task(task, path: str, fmt: str, on_example: Optional[Callable[[int], None]] = None) -> tuple[int, int]:
    """Write every example of ``task`` atomically; returns ``(examples, bytes)``."""
    count = 0
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for ex in task:
                    f.write(json.dumps(ex, ensure_ascii=False, default=str) + "\n")
                    count += 1
                    if on_example:
                        on_example(1)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = []
            for ex in task:
                # nested task-specific fields (metadata) become JSON text: parquet wants one schema
                rows.append({k: (v if isinstance(v, (str, int, float, bool)) or v is None
                                 else json.dumps(_jsonable(v), ensure_ascii=False)) for k, v in ex.items()})
                count += 1
                if on_example:
                    on_example(1)
            pq.write_table(pa.Table.from_pylist(rows), tmp)
    return count, os.path.getsize(path)


def run(args) -> int:
    if args.num_samples <= 0:
        raise TaskError(f"--num-samples: must be > 0, got {args.num_samples}")
    params = parse_params(args.param)
    if args.levels is not None:
        if args.task != "causal_loop":
            raise TaskError(f"--levels: only for causal_loop (use --param for {args.task})")
        params["levels"] = args.levels
    stem = args.name or args.task.replace("/", "_")
    path = os.path.join(args.out, f"{stem}.{args.format}")
    t0 = time.perf_counter()
    with _progress(args.num_samples, args.quiet, f"generate {args.task}") as bar:
        if args.task == "causal_loop":
            from metareason.data.causal_loop import parse_params as parse_cl

            cfg = parse_cl(params)
            n = args.num_samples
            size = write_causal_loop(cfg, args.seed, n, path, args.format, bar.update)
        else:
            task = build_task(args.task, params, args.seed, args.num_samples)
            bar.total = len(task)
            n, size = write_task(task, path, args.format, bar.update)
    dt = time.perf_counter() - t0
    print(f"wrote {n} examples to {path} ({size / 1e6:.1f} MB) in {dt:.2f} s ({n / max(dt, 1e-9):,.0f} samples/s)")
    return 0
