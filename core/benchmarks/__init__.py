"""Benchmarks run by ``metareason bench <name>``; results are written under bench/results/."""
import platform

from metareason.durable import write_json_atomic, write_text_atomic


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


def repo_relative(path) -> str:
    """``path`` relative to the repository when it lies inside it (results files are committed, so
    they must not record this machine's absolute paths); else as given."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)
