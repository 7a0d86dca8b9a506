"""Examples the pipelines work on: the run config's ``data.train`` or ``data.eval`` tasks."""
from __future__ import annotations

from typing import Optional

from metareason.api import UserError


def load_examples(kernel, split: str = "train", limit: Optional[int] = None) -> list[tuple[object, dict]]:
    """``(task, example)`` pairs of every task of ``data.<split>`` (at most ``limit`` in all)."""
    specs = getattr(kernel.config.data, split)
    if not specs:
        raise UserError(f"{kernel.source}: data.{split}: no tasks configured (the questions to work on)")
    out = []
    for i, spec in enumerate(specs):
        task = kernel.build_task(spec, field=f"data.{split}[{i}]")
        for j in range(len(task)):
            if limit is not None and len(out) >= limit:
                return out
            ex = dict(task[j])
            ex.setdefault("id", f"{spec.task}/{j}")
            out.append((task, ex))
    return out


def section_of(kernel):
    section = getattr(kernel.config, "behaviors", None)
    if section is None:
        raise UserError(f"{kernel.source}: the behaviors plugin is not loaded (check `plugins:`)")
    return section
