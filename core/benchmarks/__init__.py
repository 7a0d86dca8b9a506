"""Benchmarks run by ``metareason bench <name>``; each writes its record to ``--out``, by default under
``bench-results/`` in the working directory (this repository's recorded results: ``--out bench/results``)."""
import os
import platform

from metareason.durable import write_json_atomic, write_text_atomic

DEFAULT_OUT = "bench-results"  # relative to the working directory


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), for benchmark records."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_mb() -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, max RSS otherwise."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_record(out, record: dict, markdown: str) -> None:
    """``out`` (JSON) and ``out`` with ``.md`` (the table), each replaced atomically."""
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    write_text_atomic(out.with_suffix(".md"), markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def relative_path(path) -> str:
    """``path`` for a record: the packaged quickstart as ``configs/quickstart.yaml`` (its twin in the
    repository), a path inside the working directory relative to it (records are committed, so they
    must not hold this machine's absolute paths), any other as given."""
    from pathlib import Path

    from metareason.configs import QUICKSTART

    resolved = Path(path).resolve()
    if resolved == QUICKSTART.resolve():
        return "configs/quickstart.yaml"
    try:
        return str(resolved.relative_to(Path(os.getcwd()).resolve()))
    except ValueError:
        return str(path)
