"""What a task is: raw rows → prompt + candidate completions (+ gold), and seeded splits.

A task module defines how to read its official files and how to format one row; everything
else (sampling, scoring, metrics) is shared. Splits follow MeZO's protocol: 1000 train and
500 dev examples sampled from the training pool, up to 1000 test examples from the held-out
file, all seeded and disjoint.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SparseZOError


@dataclass
class Example:
    """One formatted example: ``prompt`` followed by each candidate; ``gold`` indexes the right one."""

    prompt: str
    candidates: list[str]
    gold: int
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: subclasses set ``name`` and implement ``load_pools`` and ``format``."""

    name: str = ""
    metric: str = "accuracy"

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir) if data_dir else None

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        """(training pool, test pool) of raw rows from the official files."""
        raise NotImplementedError

    def format(self, row: dict) -> Example:
        raise NotImplementedError

    def splits(self, seed: int = 0, num_train: int = 1000, num_dev: int = 500, num_test: int = 1000) -> dict[str, list[Example]]:
        """Seeded, disjoint train/dev samples from the training pool and a test sample."""
        train_pool, test_pool = self.load_pools()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train_pool))
        if num_train + num_dev > len(train_pool):
            raise SparseZOError(
                f"task {self.name}: asked for {num_train} train + {num_dev} dev examples but the training pool "
                f"has {len(train_pool)}; lower --num-train/--num-dev"
            )
        test_order = rng.permutation(len(test_pool))[:num_test]
        pick = lambda pool, idx: [self.format(pool[int(i)]) for i in idx]  # noqa: E731
        return {
            "train": pick(train_pool, order[:num_train]),
            "dev": pick(train_pool, order[num_train : num_train + num_dev]),
            "test": pick(test_pool, np.sort(test_order)),
        }


def read_tsv(path: Path, required: list[str]) -> list[dict]:
    """Rows of a TSV with a header; columns are found by name, never by position."""
    if not path.is_file():
        raise SparseZOError(f"data file {path} does not exist; check --data-dir or SPARSEZO_ASSETS")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SparseZOError(f"cannot read data file {path}: {e}") from e
    missing = [c for c in required if c not in header]
    if missing:
        raise SparseZOError(f"data file {path} lacks column(s) {missing} (header: {header}); is it the right file?")
    if not rows:
        raise SparseZOError(f"data file {path} has a header but no rows")
    return rows
