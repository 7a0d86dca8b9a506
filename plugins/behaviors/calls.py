"""Generator calls of the pipelines: retried with backoff, failures pinned to an example."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class CallFailure:
    example_id: str
    stage: str
    error: str


def with_retries(fn: Callable[[], T], retries: int, backoff: float, what: str, quiet: bool = False) -> T:
    """``fn()``; on an exception retried ``retries`` times (``backoff`` seconds, doubling)."""
    delay = backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any generator failure is retried, then reported
            if attempt == retries:
                raise
            if not quiet:
                print(f"[behaviors] {what}: {type(exc).__name__}: {exc}; retry {attempt + 1}/{retries}",
                      file=sys.stderr, flush=True)
            time.sleep(delay)
            delay *= 2


def generate_texts(generator, prompts: Sequence[str], section, stop: Optional[list[str]] = None,
                   max_new_tokens: Optional[int] = None) -> list:
    """One completion per prompt (greedy unless ``behaviors.temperature``)."""
    return generator.generate(list(prompts), n=1, max_new_tokens=max_new_tokens or section.max_new_tokens,
                              temperature=section.temperature, stop=stop)


def stage_call(generator, prompts: list[str], ids: list[str], section, stage: str,
               quiet: bool = False) -> tuple[dict[int, object], list[CallFailure]]:
    """The completions of ``prompts`` keyed by position; the whole batch is tried first (with
    retries); when it still fails, each prompt alone (with retries), so a failure names its
    example and the others still get their answers."""
    what = f"{stage} ({getattr(generator, 'name', 'generator')})"
    if len(prompts) == 1:
        what += f" example {ids[0]}"
    try:
        got = with_retries(lambda: generate_texts(generator, prompts, section), section.retries,
                           section.retry_backoff, what, quiet)
        return dict(enumerate(got)), []
    except Exception as exc:  # noqa: BLE001
        if len(prompts) == 1:
            return {}, [CallFailure(ids[0], stage, f"{type(exc).__name__}: {exc}".splitlines()[0])]
    out, failures = {}, []
    for i, (p, eid) in enumerate(zip(prompts, ids)):
        one, fail = stage_call(generator, [p], [eid], section, stage, quiet)
        failures.extend(fail)
        if not fail:
            out[i] = one[0]
    return out, failures
