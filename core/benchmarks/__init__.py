"""Benchmarks run by ``metareason bench <name>``; results are written under bench/results/."""
import platform


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
