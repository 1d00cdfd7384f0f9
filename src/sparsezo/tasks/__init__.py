"""Task registry: one module per task, one entry here."""

from __future__ import annotations

from pathlib import Path

from ..errors import SparseZOError
from .base import Example, Task
from .boolq import BoolQ
from .cb import CB
from .copa import COPA
from .multirc import MultiRC
from .record import ReCoRD
from .rte import RTE
from .sst2 import SST2
from .wic import WiC
from .wsc import WSC

TASKS: dict[str, type[Task]] = {
    "sst2": SST2, "rte": RTE, "cb": CB, "boolq": BoolQ, "wsc": WSC, "wic": WiC, "multirc": MultiRC, "copa": COPA,
    "record": ReCoRD,
}


def get_task(name: str, data_dir: str | Path | None = None) -> Task:
    if name not in TASKS:
        raise SparseZOError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](data_dir)


__all__ = ["Example", "TASKS", "Task", "get_task"]
