"""``reasoning_gym/<name>``: every generator of the ``reasoning-gym`` package as a task.

The dataset is ``reasoning_gym.create_dataset(name, size=num_samples, seed=seed, **params)``;
every param except ``name`` is passed to the dataset's config (``min_animals: 3`` ...), so
unknown or invalid ones are reported as ``params.<key>`` with the config's own fields listed.

Examples: ``prompt`` is the dataset's question, ``answer`` its oracle answer, ``group`` the
dataset name, ``metadata`` the dataset's metadata (needed by its scorer). The SFT
``completion`` is the answer; where the dataset ships a worked solution as text
(``metadata["answer_cot"]``, e.g. ``gsm_symbolic``) it is ``<solution>\\nanswer: <answer>``.

Scoring uses the dataset's own ``score_answer(answer, entry)`` (some give partial credit). The
answer in a model completion is the text after the last ``answer:`` marker, else the content of
the last ``<answer>...</answer>`` tag, else the whole completion, stripped. With
``params.extract: last_integer`` the fallback is the completion's last integer instead of the
whole completion (for small chat models that work a problem out but rarely write the marker;
the marker and the tag still win where present).

Examples are generated on first access (reasoning-gym builds item ``i`` from ``seed + i``), so a
large ``num_samples`` costs nothing until it is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Optional

from metareason.data.base import Task, TaskError

_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


_INTEGER = re.compile(r"-?\d+")
EXTRACTORS = ("marker", "last_integer")


def extract_answer(completion: Optional[str], extract: str = "marker") -> Optional[str]:
    """The answer in a model completion (see the module docstring); ``None`` when empty."""
    if completion is None:
        return None
    markers = list(_MARKER.finditer(completion))
    if markers:
        text = completion[markers[-1].end():]
    else:
        tags = _TAG.findall(completion)
        if tags:
            text = tags[-1]
        elif extract == "last_integer":
            found = _INTEGER.findall(completion)
            text = found[-1] if found else ""
        else:
            text = completion
    text = text.strip()
    return text or None


def dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymTask(Task):
    """Lazily generated reasoning-gym items scored by the dataset's ``score_answer``."""

    def __init__(self, name: str, dataset: Any, extract: str = "marker"):
        self.extract = extract
        self.name = f"reasoning_gym/{name}"
        self.dataset_name = name
        self.dataset = dataset
        self._cache: dict[int, dict] = {}

    @property
    def examples(self):  # type: ignore[override]
        return self

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, i: int) -> dict:
        ex = self._cache.get(i)
        if ex is None:
            entry = self.dataset[i]
            answer = str(entry["answer"])
            metadata = entry.get("metadata", {}) or {}
            cot = metadata.get("answer_cot")
            completion = f"{cot.strip()}\nanswer: {answer}" if isinstance(cot, str) and cot.strip() else answer
            ex = {"id": f"{self.name}/{self.dataset.seed}/{i}", "prompt": str(entry["question"]),
                  "completion": completion, "answer": answer, "group": self.dataset_name,
                  "metadata": metadata}
            self._cache[i] = ex
        return dict(ex)

    def groups(self) -> list[str]:
        return [self.dataset_name]

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_answer(completion, self.extract)

    def score(self, completion: str, example: dict) -> float:
        entry = {"question": example.get("prompt", ""), "answer": example["answer"],
                 "metadata": example.get("metadata", {})}
        try:
            return float(self.dataset.score_answer(self.extract_answer(completion), entry))
        except Exception:  # a scorer that chokes on malformed model output scores it as wrong
            return 0.0


def make_task(params: dict, seed: int, num_samples: int) -> ReasoningGymTask:
    """Factory registered as the ``reasoning_gym/`` family (``params["name"]`` is the suffix)."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise TaskError(f"reasoning_gym tasks need the reasoning-gym package ({exc})") from None
    params = dict(params or {})
    name = params.pop("name", None)
    if not isinstance(name, str) or not name:
        raise TaskError("params.name: a reasoning-gym dataset name is required (task: reasoning_gym/<name>)")
    if name not in DATASETS:
        names = sorted(DATASETS)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TaskError(f"params.name: unknown reasoning-gym dataset {name!r} ({hint}{len(names)} available, "
                        f"e.g. {', '.join(names[:8])}, ...)")
    extract = params.pop("extract", "marker")
    if extract not in EXTRACTORS:
        raise TaskError(f"params.extract: {extract!r} is not one of {', '.join(EXTRACTORS)}")
    for reserved, use in (("size", "num_samples"), ("seed", "seed")):
        if reserved in params:
            raise TaskError(f"params.{reserved}: set the task spec's {use} instead")
    config_cls = DATASETS[name][1]
    if dataclasses.is_dataclass(config_cls):
        fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("size", "seed")]
        for key in params:
            if key not in fields:
                raise TaskError(f"params.{key}: unknown parameter for reasoning_gym/{name} "
                                f"(known: {', '.join(fields) or 'none'})")
    try:
        dataset = reasoning_gym.create_dataset(name, size=int(num_samples), seed=int(seed), **params)
    except TaskError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise TaskError(f"params: reasoning_gym/{name} rejected its config: {exc or type(exc).__name__}") from None
    return ReasoningGymTask(name, dataset, extract)
