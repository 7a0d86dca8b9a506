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
