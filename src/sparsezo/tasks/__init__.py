"""Task registry: one module per task, one entry here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SparseZOError
from .base import Example, Task
from .boolq import BoolQ
from .cb import CB
from .copa import COPA
from .custom import CustomTask
from .drop import DROP
from .multirc import MultiRC
from .record import ReCoRD
from .rte import RTE
from .squad import SQuAD
from .sst2 import SST2
from .wic import WiC
from .wsc import WSC

TASKS: dict[str, type[Task]] = {
    "sst2": SST2, "rte": RTE, "cb": CB, "boolq": BoolQ, "wsc": WSC, "wic": WiC, "multirc": MultiRC, "copa": COPA,
    "record": ReCoRD, "squad": SQuAD, "drop": DROP, "custom": CustomTask,
}


def get_task(name: str, data_dir: str | Path | None = None, **options: Any) -> Task:
    """The task called ``name``; ``options`` configure ``custom`` (data, template, labels, ...)."""
    if name not in TASKS:
        raise SparseZOError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](data_dir, **options)


__all__ = ["Example", "TASKS", "Task", "get_task"]
