"""User tasks: any labelled JSONL/CSV/TSV file, a prompt template and a label → words map.

Settings come from keyword options (the CLI's ``--data --template --labels [--label-field]
[--test-data]``) or a task file (``--task-file``, JSON, or YAML when PyYAML is installed)
holding the same keys; options given both ways take the flag's value, and relative paths in a
task file are read from the task file's folder. The template fills ``{field}`` placeholders
from each row (``{{``/``}}`` for literal braces); the candidates are the label words (several
classes, several tokens each: include the leading space, e.g. ``" great"``). In the template, the two
characters ``\\n`` and ``\\t`` become a newline and a tab and ``\\\\`` one backslash: a shell
passes ``--template "Question: {q}\\nAnswer:"`` with a literal backslash-n, which would otherwise
reach every prompt silently; any other backslash is kept, with a warning. Non-string labels
match the map's keys as JSON writes them (``1`` → ``"1"``, ``true`` → ``"true"``).

Pools: training = the data file; test = ``test_data`` if given, else a fixed 20% holdout of the
data file (seed 0 whatever the run seed, so every run of a task is tested on the same rows).
Every row is checked when the files are read, so a bad row fails before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import string
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SparseZOError
from .base import Example, Task

KEYS = ("data", "template", "labels", "label_field", "test_data")
HOLDOUT = 0.2
ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}

log = logging.getLogger("sparsezo")


def unescape_template(template: str) -> str:
    """``template`` with ``\\n``, ``\\t`` and ``\\\\`` decoded; warns on any other backslash left in it."""
    stray: list[str] = []

    def decode(m: re.Match) -> str:
        if m.group(1) in ESCAPES:
            return ESCAPES[m.group(1)]
        stray.append(m.group(0))
        return m.group(0)

    out = re.sub(r"\\(.?)", decode, template, flags=re.S)
    if stray:
        log.warning("--template %r keeps a literal backslash (%s) in every prompt; only \\n, \\t and \\\\ "
                    "are escapes", template, ", ".join(map(repr, stray)))
    return out


def read_task_file(path: Path) -> dict[str, Any]:
    """The settings of a JSON/YAML task file, relative paths resolved against its folder."""
    if not path.is_file():
        raise SparseZOError(f"task file {path} does not exist; check --task-file")
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not JSON
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
    """(line number, row) of a .jsonl/.csv/.tsv file, chosen by extension; header line = 1 for CSV/TSV.

    A UTF-8 byte-order mark (what Excel writes) is skipped, or the first column would be named
    ``\ufefftext``. A CSV/TSV header with repeated or empty column names, and a row with more or
    fewer fields than the header, are errors: csv.DictReader would silently drop or shift values.
    """
    if not path.is_file():
        raise SparseZOError(f"data file {path} does not exist; check --data/--test-data")
    if path.suffix not in (".jsonl", ".csv", ".tsv"):
        raise SparseZOError(f"data file {path} must end in .jsonl, .csv or .tsv (got {path.suffix!r})")
    rows: list[tuple[int, dict]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if path.suffix == ".jsonl":
                for i, line in enumerate(f, 1):
                    if line.strip():
                        rows.append((i, _json_row(path, i, line)))
            else:
                tsv = path.suffix == ".tsv"
                reader = csv.DictReader(f, delimiter="\t" if tsv else ",",
                                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
                header = reader.fieldnames or []
                repeated = sorted({c for c in header if header.count(c) > 1})
                if repeated or any(not c.strip() for c in header):
                    raise SparseZOError(f"data file {path} line 1: the header {header} has "
                                        + (f"repeated column(s) {repeated}" if repeated else "an empty column name")
                                        + "; give every column one unique name")
                for row in reader:
                    if None in row or None in row.values():
                        n = len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
                        sep = "tab" if tsv else "comma"
                        raise SparseZOError(f"data file {path} line {reader.line_num} has {n} field(s), the header has "
                                            f"{len(header)}; fix the row (quote a field that contains a {sep})")
                    rows.append((reader.line_num, row))
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
        template = unescape_template(spec["template"]) if isinstance(spec["template"], str) else spec["template"]
        self.template, self.fields = template, _fields(template)
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
        used = list(dict.fromkeys(self.fields + [self.label_field]))
        missing = [f for f in used if f not in row]
        if missing:
            raise SparseZOError(f"{where} lacks field(s) {missing} used by the template or --label-field "
                                f"(it has {sorted(k for k in row if k is not None)})")
        null = [f for f in used if row[f] is None]
        if null:
            raise SparseZOError(f"{where} has null in field(s) {null}; give every row a value there or drop the row")
        if isinstance(row[self.label_field], str) and not row[self.label_field].strip():
            raise SparseZOError(f"{where} has an empty label (field {self.label_field!r}); label the row or drop it")
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
            labels = json.loads(labels, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise SparseZOError(f"--labels is not valid JSON ({e}); e.g. "
                                f"'{{\"pos\": \" great\", \"neg\": \" terrible\"}}'") from e
    words_ok = isinstance(labels, dict) and all(isinstance(w, str) and w.strip() for w in labels.values())
    if not words_ok or len(labels) < 2:
        raise SparseZOError(f"--labels must map >= 2 labels to non-empty words, e.g. "
                            f"{{\"pos\": \" great\", \"neg\": \" terrible\"}}; got {labels!r:.100}")
    out: dict[str, str] = {}
    for k, w in labels.items():
        key = _label_key(k)
        if key in out:
            raise SparseZOError(f"--labels has label {key!r} twice (as {k!r} and an equal key); give each label once")
        out[key] = w
    by_words: dict[str, str] = {}
    for key, w in out.items():  # two classes with one answer: the loss cannot tell them apart (ln 2 forever)
        if w in by_words:
            raise SparseZOError(f"--labels maps {by_words[w]!r} and {key!r} to the same words {w!r}; every label "
                                "needs its own words, or the model cannot tell the classes apart")
        by_words[w] = key
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: a repeated key is an error (JSON keeps only the last one, silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SparseZOError(f"--labels has the key {k!r} twice; give each label once")
        out[k] = v
    return out
