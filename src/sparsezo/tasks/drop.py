"""DROP: discrete reasoning over paragraphs (counting, arithmetic, dates), evaluated by generation.

MeZO's template: ``Passage: …\\nQuestion: …\\nAnswer:``. Gold answers follow MeZO (the
Hugging Face ``drop`` answer spans): a number answer is its string, a date is its non-empty
``day month year`` parts joined by spaces, and every span of a span answer is an acceptable
answer on its own (max over answers, so multi-span questions are scored leniently — the
official bag-of-spans alignment is not implemented). ``validated_answers`` (dev file) add
more acceptable answers. Training pool ``train.json``, test pool ``dev.json`` from
``data/drop/`` of the shared assets unless ``--data-dir`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import assets_dir
from ..errors import SparseZOError
from .base import Example, Task, read_json
from .squad import answer_list


def answer_strings(answer: dict) -> list[str]:
    """The acceptable strings of one DROP answer object: number, else spans, else the date."""
    number = answer.get("number")
    if number not in (None, ""):
        return [str(number)]
    if answer.get("spans"):
        return list(answer["spans"])
    date = answer.get("date") or {}
    return [" ".join(str(date[k]) for k in ("day", "month", "year") if date.get(k) not in (None, ""))]


def _questions(path: Path) -> list[dict]:
    """One row per question: idx (query_id), passage, question and all gold answer strings."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise SparseZOError(f"drop: {path} is not an object of passages; expected the DROP JSON schema")
    rows = []
    for pid, entry in doc.items():
        try:
            for qa in entry["qa_pairs"]:
                answers = [s for a in [qa["answer"], *qa.get("validated_answers", [])] for s in answer_strings(a)]
                rows.append({"idx": qa["query_id"], "passage": entry["passage"], "question": qa["question"],
                             "answers": answers})
        except (KeyError, TypeError, AttributeError) as e:
            raise SparseZOError(f"drop: {path} passage {pid!r} breaks the schema passage/qa_pairs[].query_id/"
                                f"question/answer{{number,date,spans}} ({type(e).__name__}: {e})") from e
    if not rows:
        raise SparseZOError(f"drop: {path} holds no questions")
    return rows


class DROP(Task):
    name = "drop"
    kind = "generation"
    metric = "f1"

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "drop"
        return _questions(root / "train.json"), _questions(root / "dev.json")

    def format(self, row: dict) -> Example:
        passage, question = self.text(row, "passage"), self.text(row, "question")
        answers = answer_list(row.get("answers") or [], f"drop: question idx={row.get('idx')}")
        prompt = f"Passage: {passage}\nQuestion: {question}\nAnswer:"
        return Example(prompt, [" " + answers[0]], 0, {"idx": row.get("idx")}, answers)
