"""What a task is: raw rows → prompt + candidate completions (+ gold), and seeded splits.

A task module defines how to read its official files and how to format one row; everything
else (sampling, scoring, metrics) is shared. Splits follow MeZO's protocol: 1000 train and
500 dev examples sampled from the training pool, up to 1000 test examples from the held-out
file, all seeded and disjoint. Pools smaller than train + dev (SuperGLUE's 32-shot files) are
split in the same proportions instead, with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SparseZOError

log = logging.getLogger(__name__)
MIN_DEV = 32  # dev examples below which "best dev" is mostly noise (±9 points at 50% accuracy)


@dataclass
class Example:
    """One formatted example: ``prompt`` followed by each candidate; ``gold`` indexes the right one.

    Generation tasks have a single candidate (the first gold answer, so LM-loss training works
    unchanged) and list every acceptable answer in ``answers`` for EM/F1.
    """

    prompt: str
    candidates: list[str]
    gold: int
    meta: dict[str, Any] = field(default_factory=dict)
    answers: list[str] | None = None


class Task:
    """Base class: subclasses set ``name`` and implement ``load_pools`` and ``format``.

    ``kind`` says how a task is evaluated: ``classification`` scores the candidates (accuracy),
    ``generation`` decodes an answer greedily and compares it with ``Example.answers`` (F1/EM).
    Only tasks that need settings beyond a data folder (``custom``) accept ``options``.
    """

    name: str = ""
    kind: str = "classification"
    metric: str = "accuracy"
    verbalizer: dict[Any, str] = {}  # label as stored in the data file → its candidate completion

    def __init__(self, data_dir: str | Path | None = None, **options: Any):
        if options:
            flags = ", ".join("--" + k.replace("_", "-") for k in options)
            raise SparseZOError(f"task {self.name} takes no {flags}; those options are for --task custom")
        self.data_dir = Path(data_dir) if data_dir else None
        self.split_sizes: dict[str, int] = {}  # what the last ``splits`` call actually returned

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        """(training pool, test pool) of raw rows from the official files."""
        raise NotImplementedError

    def format(self, row: dict) -> Example:
        raise NotImplementedError

    def text(self, row: dict, key: str, strip: bool = True) -> str:
        """``row[key]`` as non-empty (stripped) text (``a.b`` reads nested objects), else a SparseZOError naming it."""
        value: Any = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise SparseZOError(
                f"{self.name}: row idx={row.get('idx')} has no text in field {key!r} (got {value!r:.80})"
            )
        return value.strip() if strip else value

    def gold(self, row: dict) -> int:
        """Index of ``row['label']`` among the ``verbalizer`` candidates, else a SparseZOError."""
        try:
            return list(self.verbalizer).index(row["label"])
        except (KeyError, ValueError) as e:
            raise SparseZOError(
                f"{self.name}: row idx={row.get('idx')} field 'label' is {row.get('label')!r}, "
                f"not one of {list(self.verbalizer)}"
            ) from e

    def splits(self, seed: int = 0, num_train: int = 1000, num_dev: int = 500, num_test: int = 1000) -> dict[str, list[Example]]:
        """Seeded, disjoint train/dev samples from the training pool and a test sample."""
        train_pool, test_pool = self.load_pools()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train_pool))
        n = len(train_pool)
        if num_train + num_dev > n:  # split the whole pool in the asked proportions, >= 1 of each when n >= 2
            asked = (num_train, num_dev)
            num_train = n * num_train // (num_train + num_dev)
            if asked[0] and n >= 2:
                num_train = max(num_train, 1)
            num_dev = n - num_train
            log.warning(
                "task %s: training pool has only %d rows, fewer than %d train + %d dev asked; using %d train + %d dev%s",
                self.name, n, *asked, num_train, num_dev,
                f"; {num_dev} dev examples are below the {MIN_DEV} that selecting the best step needs (it will pick "
                "noise): lower --num-train to leave more for dev, or pass --keep-last" if num_dev < min(asked[1], MIN_DEV)
                else "",
            )
        test_order = rng.permutation(len(test_pool))[:num_test]
        pick = lambda pool, idx: [self.format(pool[int(i)]) for i in idx]  # noqa: E731
        out = {
            "train": pick(train_pool, order[:num_train]),
            "dev": pick(train_pool, order[num_train : num_train + num_dev]),
            "test": pick(test_pool, np.sort(test_order)),
        }
        self.split_sizes = {k: len(v) for k, v in out.items()}
        return out


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


def read_jsonl(path: Path, required: list[str]) -> list[dict]:
    """Objects of a JSON-lines file (blank lines skipped), each checked to have the ``required`` keys."""
    if not path.is_file():
        raise SparseZOError(f"data file {path} does not exist; check --data-dir or SPARSEZO_ASSETS")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SparseZOError(
                        f"data file {path} line {i} is not valid JSON ({e}); fix or remove that line"
                    ) from e
                if not isinstance(row, dict):
                    raise SparseZOError(f"data file {path} line {i} is not a JSON object; expected one object per line")
                missing = [k for k in required if k not in row]
                if missing:
                    raise SparseZOError(
                        f"data file {path} line {i} lacks field(s) {missing}; "
                        "is it the right file (SuperGLUE JSONL schema)?"
                    )
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise SparseZOError(f"cannot read data file {path}: {e}") from e
    if not rows:
        raise SparseZOError(f"data file {path} is empty; expected one JSON object per line")
    return rows


def read_json(path: Path) -> Any:
    """The object of a single JSON file (SQuAD/DROP style), or a SparseZOError naming the file."""
    if not path.is_file():
        raise SparseZOError(f"data file {path} does not exist; check --data-dir or SPARSEZO_ASSETS")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SparseZOError(f"data file {path} is not valid JSON ({e}); is it the official file, complete?") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SparseZOError(f"cannot read data file {path}: {e}") from e


def superglue_pools(root: Path, required: list[str]) -> tuple[list[dict], list[dict]]:
    """MeZO's SuperGLUE pools: ``train_full.jsonl`` (else ``train`` + ``dev32``) to train on, ``val.jsonl`` to test."""
    full = root / "train_full.jsonl"
    if full.is_file():
        train = read_jsonl(full, required)
    else:
        train = read_jsonl(root / "train.jsonl", required) + read_jsonl(root / "dev32.jsonl", required)
    return train, read_jsonl(root / "val.jsonl", required)
