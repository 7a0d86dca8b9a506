"""Metrics: JSONL (one flat object per line), TensorBoard when installed, progress bars.

Keys are flat and slash-separated: ``step``, ``train/loss``, ``eval/accuracy``,
``eval/accuracy/level_1``, ``eval/gen_tokens/level_1``.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from metareason.durable import append_jsonl, write_jsonl_atomic, write_text_atomic


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, append: bool = False, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            write_text_atomic(self.path, "")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        append_jsonl(self.path, row)  # one fsynced line per call: a crash never tears an earlier row
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop logged rows past ``step`` (a resumed run re-logs them)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_jsonl_atomic(Path(run_dir) / "metrics.jsonl", rows)


LOG_INTERVAL_S = 60.0  # the least time between two progress lines in a log


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             quiet: bool = False, **kwargs):
    """A tqdm bar on a terminal; in a log (stderr not a terminal) a plain line at most every
    ``LOG_INTERVAL_S`` seconds (work shorter than that prints nothing); nothing in quiet mode."""
    from tqdm.std import tqdm

    if quiet:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if not sys.stderr.isatty():
        return _log_lines_class()(iterable, total=total, desc=desc, **kwargs)
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, **kwargs)


@functools.lru_cache(maxsize=None)
def _log_lines_class():  # built on first use: tqdm is imported lazily
    from tqdm.std import tqdm

    class LogLines(tqdm):
        """tqdm that writes whole lines to stderr instead of redrawing one with carriage returns,
        so a long stage under ``nohup … > log`` shows how far it is and how long it has left."""

        def __init__(self, *args, **kwargs):
            import io

            self.lines, self.printed_n = 0, None
            kwargs.update(file=io.StringIO(), mininterval=LOG_INTERVAL_S, delay=LOG_INTERVAL_S, leave=False,
                          bar_format="{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            if msg is None:  # a refresh (tqdm calls it at most every mininterval, after delay)
                self._line(self.format_meter(**self.format_dict))
            return True

        def close(self):
            if not self.disable and self.lines and self.printed_n != self.n:
                self._line(self.format_meter(**self.format_dict) + " done")
            super().close()

        def _line(self, text: str) -> None:
            print(f"[{self.desc or 'progress'}] {text}", file=sys.stderr, flush=True)
            self.lines, self.printed_n = self.lines + 1, self.n

    return LogLines
