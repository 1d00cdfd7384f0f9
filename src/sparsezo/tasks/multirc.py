"""MultiRC (SuperGLUE): is a proposed answer to a question about a paragraph correct?

The official files nest ``passage.questions[].answers[]``; the loader flattens them so that
each pool row (and each Example) is one (paragraph, question, answer, label) pair, and the
prompt asks the model to judge that one answer. Train/dev are sampled over pairs, so pairs of
one paragraph can fall on both sides. The metric is pair accuracy for now; MeZO reports F1a
and exact match per question, which is pending.
"""

from __future__ import annotations

from ..assets import assets_dir
from ..errors import SparseZOError
from .base import Example, Task, superglue_pools


def _pairs(passages: list[dict]) -> list[dict]:
    rows = []
    for p in passages:
        try:
            rows += [{"paragraph": p["passage"]["text"], "question": q["question"], "answer": a["text"],
                      "label": a["label"], "idx": a.get("idx")}
                     for q in p["passage"]["questions"] for a in q["answers"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise SparseZOError(f"multirc: passage idx={p.get('idx')} breaks the SuperGLUE schema passage.text, "
                                f"passage.questions[].question/answers[].text/label ({type(e).__name__}: {e})") from e
    return rows


class MultiRC(Task):
    name = "multirc"
    verbalizer = {True: " Yes", False: " No"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "MultiRC"
        train, test = superglue_pools(root, ["passage"])
        return _pairs(train), _pairs(test)

    def format(self, row: dict) -> Example:
        paragraph, question, answer = (self.text(row, k) for k in ("paragraph", "question", "answer"))
        prompt = (f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'
                  "Answer:")
        return Example(prompt, list(self.verbalizer.values()), self.gold(row))
