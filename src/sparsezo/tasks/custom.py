"""User tasks: any labelled JSONL/CSV/TSV file, a prompt template and a label → words map.

Settings come from keyword options (the CLI's ``--data --template --labels [--label-field]
[--test-data]``) or a task file (``--task-file``, JSON, or YAML when PyYAML is installed)
holding the same keys; options given both ways take the flag's value, and relative paths in a
task file are read from the task file's folder. The template fills ``{field}`` placeholders
from each row (``{{``/``}}`` for literal braces); the candidates are the label words (several
classes, several tokens each: include the leading space, e.g. ``" great"``). Non-string labels
match the map's keys as JSON writes them (``1`` → ``"1"``, ``true`` → ``"true"``).

Pools: training = the data file; test = ``test_data`` if given, else a fixed 20% holdout of the
data file (seed 0 whatever the run seed, so every run of a task is tested on the same rows).
Every row is checked when the files are read, so a bad row fails before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SparseZOError
from .base import Example, Task

KEYS = ("data", "template", "labels", "label_field", "test_data")
HOLDOUT = 0.2


def read_task_file(path: Path) -> dict[str, Any]:
    """The settings of a JSON/YAML task file, relative paths resolved against its folder."""
    if not path.is_file():
        raise SparseZOError(f"task file {path} does not exist; check --task-file")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise SparseZOError(f"task file {path} is YAML but PyYAML is not installed; "
                                "pip install pyyaml, or write the task file as JSON") from e
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SparseZOError(f"task file {path} is not valid YAML ({' '.join(str(e).split())})") from e
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise SparseZOError(f"task file {path} is not valid JSON ({e}); fix it or use a .yaml file") from e
    if not isinstance(spec, dict):
        raise SparseZOError(f"task file {path} must hold one object with keys {', '.join(KEYS)}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise SparseZOError(f"task file {path} has unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    for key in ("data", "test_data"):
        if isinstance(spec.get(key), str):
            spec[key] = str(path.parent / spec[key])
    return spec


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a .jsonl/.csv/.tsv file, chosen by extension; header line = 1 for CSV/TSV."""
    if not path.is_file():
        raise SparseZOError(f"data file {path} does not exist; check --data/--test-data")
    if path.suffix not in (".jsonl", ".csv", ".tsv"):
        raise SparseZOError(f"data file {path} must end in .jsonl, .csv or .tsv (got {path.suffix!r})")
    rows: list[tuple[int, dict]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for i, line in enumerate(f, 1):
                    if line.strip():
                        rows.append((i, _json_row(path, i, line)))
            else:
                tsv = path.suffix == ".tsv"
                reader = csv.DictReader(f, delimiter="\t" if tsv else ",",
                                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
                rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SparseZOError(f"cannot read data file {path}: {e}") from e
    if not rows:
        raise SparseZOError(f"data file {path} has no rows; expected labelled examples")
    return rows


def _json_row(path: Path, line: int, text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise SparseZOError(f"data file {path} line {line} is not valid JSON ({e}); fix or remove that line") from e
    if not isinstance(row, dict):
        raise SparseZOError(f"data file {path} line {line} is not a JSON object; expected one object per line")
    return row


class CustomTask(Task):
    name = "custom"

    def __init__(self, data_dir: str | Path | None = None, *, task_file: str | Path | None = None, **options: Any):
        if data_dir is not None:
            raise SparseZOError("--data-dir does not apply to --task custom; pass the file with --data")
        unknown = sorted(set(options) - set(KEYS))
        if unknown:
            raise SparseZOError(f"task custom has no option(s) {unknown}; allowed: {', '.join(KEYS)}, task_file")
        spec = read_task_file(Path(task_file)) if task_file else {}
        spec.update({k: v for k, v in options.items() if v is not None})
        missing = [k for k in ("data", "template", "labels") if not spec.get(k)]
        if missing:
            flags = ", ".join("--" + k for k in missing)
            raise SparseZOError(f"task custom needs {flags} (or a --task-file holding {', '.join(missing)})")
        super().__init__()
        self.data = Path(spec["data"])
        self.test_data = Path(spec["test_data"]) if spec.get("test_data") else None
        self.template, self.fields = spec["template"], _fields(spec["template"])
        self.verbalizer = _labels(spec["labels"])
        self.label_field = spec.get("label_field") or "label"

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        train = self._rows(self.data)
        if self.test_data:
            return train, self._rows(self.test_data)
        if len(train) < 2:
            raise SparseZOError(f"data file {self.data} has {len(train)} row; a 20% holdout test split needs >= 2 "
                                "rows, or pass --test-data")
        order = np.random.default_rng(0).permutation(len(train))
        n_test = max(1, round(HOLDOUT * len(train)))
        return [train[i] for i in sorted(order[n_test:])], [train[i] for i in sorted(order[:n_test])]

    def _rows(self, path: Path) -> list[dict]:
        return [self._checked(row, f"data file {path} line {i}") for i, row in read_rows(path)]

    def _checked(self, row: dict, where: str) -> dict:
        """``row`` marked as checked, after checking its fields and label (errors say ``where`` it is)."""
        missing = [f for f in self.fields + [self.label_field] if row.get(f) is None]
        if missing:
            raise SparseZOError(f"{where} lacks field(s) {missing} used by the template or --label-field "
                                f"(it has {sorted(k for k in row if k is not None)})")
        label = _label_key(row[self.label_field])
        if label not in self.verbalizer:
            raise SparseZOError(f"{where} has label {label!r}, not in the label map {list(self.verbalizer)}; "
                                "add it to --labels or fix the row")
        return {**row, "_where": where}

    def format(self, row: dict) -> Example:
        row = row if "_where" in row else self._checked(row, "row")
        try:
            prompt = self.template.format_map({f: row[f] for f in self.fields})
        except (ValueError, TypeError) as e:
            raise SparseZOError(f"{row['_where']}: --template {self.template!r} cannot format it ({e})") from e
        gold = list(self.verbalizer).index(_label_key(row[self.label_field]))
        return Example(prompt, list(self.verbalizer.values()), gold)


def _label_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _fields(template: Any) -> list[str]:
    """The ``{field}`` names of a template; only plain names are allowed."""
    if not isinstance(template, str) or not template.strip():
        raise SparseZOError("--template must be a non-empty string with {field} placeholders")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SparseZOError(f"--template {template!r} is malformed ({e}); write literal braces as {{{{ and }}}}") from e
    fields = [name for _, name, _, _ in parsed if name is not None]
    bad = [f for f in fields if not f or f.isdigit() or any(c in f for c in ".[]")]
    if bad or not fields:
        raise SparseZOError(f"--template {template!r} needs named placeholders like {{sentence}} "
                            f"(no empty, positional, attribute or index fields: {bad})")
    return list(dict.fromkeys(fields))


def _labels(labels: Any) -> dict[str, str]:
    """The label → words map, from a dict or its JSON text; at least two labels, non-empty words."""
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as e:
            raise SparseZOError(f"--labels is not valid JSON ({e}); e.g. "
                                f"'{{\"pos\": \" great\", \"neg\": \" terrible\"}}'") from e
    words_ok = isinstance(labels, dict) and all(isinstance(w, str) and w.strip() for w in labels.values())
    if not words_ok or len(labels) < 2:
        raise SparseZOError(f"--labels must map >= 2 labels to non-empty words, e.g. "
                            f"{{\"pos\": \" great\", \"neg\": \" terrible\"}}; got {labels!r:.100}")
    return {_label_key(k): w for k, w in labels.items()}
