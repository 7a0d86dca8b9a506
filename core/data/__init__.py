"""Tasks and data: the task registry, built-in task generators, tokenisation with label masks."""
from metareason.data.base import Task, TaskError, ListTask

__all__ = ["Task", "TaskError", "ListTask"]
