"""SQuAD v1.1: extractive question answering, evaluated by generating the answer (F1, EM).

MeZO's template: ``Title: …\\nContext: …\\nQuestion: …\\nAnswer:``; the model continues with
the answer and stops at the first newline. The official nested file
(``data[].paragraphs[].qas[]``) is flattened to one row per question. Training pool:
``train.json``; test pool: ``dev.json`` (the official dev set, MeZO's test set), read from
``data/squad/`` of the shared assets unless ``--data-dir`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import assets_dir
from ..errors import SparseZOError
from .base import Example, Task, read_json


def answer_list(texts: list, where: str) -> list[str]:
    """Distinct non-empty stripped answers in order of first appearance, else a SparseZOError."""
    answers = list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))
    if not answers:
        raise SparseZOError(f"{where} has no non-empty gold answer; every question needs one")
    return answers


def _questions(path: Path) -> list[dict]:
    """One row per question: idx (the official id), title, context, question and all gold answer texts."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise SparseZOError(f"squad: {path} has no top-level 'data' list; expected the SQuAD v1.1 JSON schema")
    rows = []
    for i, article in enumerate(doc["data"]):
        try:
            for para in article["paragraphs"]:
                rows += [{"idx": qa["id"], "title": article["title"], "context": para["context"],
                          "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
                         for qa in para["qas"]]
        except (KeyError, TypeError) as e:
            raise SparseZOError(f"squad: {path} article {i} breaks the schema data[].title/paragraphs[].context/"
                                f"qas[].id/question/answers[].text ({type(e).__name__}: {e})") from e
    if not rows:
        raise SparseZOError(f"squad: {path} holds no questions")
    return rows


class SQuAD(Task):
    name = "squad"
    kind = "generation"
    metric = "f1"

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "squad"
        return _questions(root / "train.json"), _questions(root / "dev.json")

    def format(self, row: dict) -> Example:
        title, context, question = (self.text(row, k) for k in ("title", "context", "question"))
        answers = answer_list(row.get("answers") or [], f"squad: question idx={row.get('idx')}")
        prompt = f"Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"
        return Example(prompt, [" " + answers[0]], 0, {"idx": row.get("idx")}, answers)
