"""The task interface every data source implements.

An *example* is a plain dict::

    {"id": "causal_loop/1/17",     # stable identifier
     "prompt": "...",              # what the model sees
     "completion": "...",          # SFT target (may contain a step-by-step solution)
     "answer": "42",               # gold final answer, as text
     "group": "level_1",           # metrics are also reported per group
     ...}                          # any task-specific fields

A task is a deterministic, indexable sequence of examples plus a scorer.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from metareason.config import describe_validation_error


class TaskError(ValueError):
    """Bad task parameters or data; the message names the parameter or file."""


class TaskParams(BaseModel):
    """Base of a task's ``params`` model: unknown keys are errors, as in every config section."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=BaseModel)


def parse_params(model: type[P], params: Optional[dict]) -> P:
    """``params`` validated by ``model``; a :class:`TaskError` ``params.field: message`` (the
    config's one-line form, which the kernel prefixes with the file and the task spec) otherwise."""
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as err:
        raise TaskError(describe_validation_error(err, prefix="params")) from None


class Task(Sequence):
    """Base class. Subclasses fill ``examples`` (or override ``__getitem__``) and ``score``."""

    name: str = "task"

    def __init__(self, examples: Optional[list[dict]] = None):
        self.examples: list[dict] = examples or []

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.example(i)

    def example(self, i: int) -> dict:
        """Example ``i`` (``0 <= i < len``). Lazy tasks override this to build it on access."""
        return self.examples[i]

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def extract_answer(self, completion: str) -> Optional[str]:
        """The final answer in a model completion, or ``None`` if none is found."""
        raise NotImplementedError(f"task {self.name!r} does not define extract_answer")

    def score(self, completion: str, example: dict) -> float:
        """1.0 for a correct completion, 0.0 otherwise (tasks may give partial credit)."""
        predicted = self.extract_answer(completion)
        return float(predicted is not None and predicted.strip() == str(example["answer"]).strip())

    def groups(self) -> list[str]:
        return sorted({str(e.get("group", "all")) for e in self})


class ListTask(Task):
    """A task over a given list of examples, scored by a given function."""

    def __init__(self, name: str, examples: list[dict], scorer: Any, extractor: Any = None):
        super().__init__(examples)
        self.name = name
        self._scorer = scorer
        self._extractor = extractor

    def extract_answer(self, completion: str) -> Optional[str]:
        if self._extractor is None:
            return completion.strip()
        return self._extractor(completion)

    def score(self, completion: str, example: dict) -> float:
        return float(self._scorer(completion, example))
