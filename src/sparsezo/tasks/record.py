"""ReCoRD (SuperGLUE): fill the ``@placeholder`` of a cloze query with an entity of the passage.

Each candidate is the whole query with the placeholder replaced by one of the passage's
entities (deduplicated, in order of first appearance), scored as a continuation of the
passage, whose ``@highlight`` markers become "- " bullet lines. Gold is the first entity
whose text is an answer; other entities that are also answers count as wrong (the official
max-over-answers EM/F1 is pending). No official validation set is stored here, so the
training pool is ``train.jsonl`` and the test pool is ``dev32.jsonl`` (32 queries each).
"""

from __future__ import annotations

from ..assets import assets_dir
from ..errors import SparseZOError
from .base import Example, Task, read_jsonl


def _queries(passages: list[dict]) -> list[dict]:
    """One row per query (``qas`` entry), each with its passage."""
    try:
        return [{"passage": p["passage"], **qa} for p in passages for qa in p["qas"]]
    except TypeError as e:
        raise SparseZOError(f"record: field 'qas' must be a list of objects with query/answers ({e})") from e


class ReCoRD(Task):
    name = "record"

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "ReCoRD"
        train, test = (_queries(read_jsonl(root / f, ["passage", "qas"])) for f in ("train.jsonl", "dev32.jsonl"))
        return train, test

    def format(self, row: dict) -> Example:
        text, query = self.text(row, "passage.text", strip=False), self.text(row, "query")
        try:  # SuperGLUE's entity and answer spans include their end character
            entities = list(dict.fromkeys(text[e["start"] : e["end"] + 1] for e in row["passage"]["entities"]))
            answers = {a["text"] for a in row["answers"]}
        except (KeyError, TypeError) as e:
            raise SparseZOError(
                f"record: row idx={row.get('idx')} has malformed passage.entities or answers ({e!r})"
            ) from e
        gold = next((i for i, e in enumerate(entities) if e in answers), None)
        if gold is None or "@placeholder" not in query or "" in entities:
            raise SparseZOError(f"record: row idx={row.get('idx')} needs an '@placeholder' in 'query', non-empty "
                                "'passage.entities' spans, and an entity whose text is among 'answers'")
        prompt = text.strip().replace("@highlight\n", "- ") + "\n"
        return Example(prompt, [query.replace("@placeholder", e) for e in entities], gold)
