"""Task registry: one module per task, one entry here."""

from __future__ import annotations

from pathlib import Path

from ..errors import SparseZOError
from .base import Example, Task
from .sst2 import SST2

TASKS: dict[str, type[Task]] = {"sst2": SST2}


def get_task(name: str, data_dir: str | Path | None = None) -> Task:
    if name not in TASKS:
        raise SparseZOError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](data_dir)


__all__ = ["Example", "TASKS", "Task", "get_task"]
