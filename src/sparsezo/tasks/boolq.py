"""BoolQ (SuperGLUE): a yes/no question about a Wikipedia passage.

BoolQ questions are already yes/no questions (lower-cased, without "?"), so the passage is
followed by the question as written plus "?" and an ``Answer:`` cue; no rewording needed.
"""

from __future__ import annotations

from ..assets import assets_dir
from .base import Example, Task, superglue_pools


class BoolQ(Task):
    name = "boolq"
    verbalizer = {True: " Yes", False: " No"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "BoolQ"
        return superglue_pools(root, ["passage", "question", "label"])

    def format(self, row: dict) -> Example:
        prompt = f"{self.text(row, 'passage')}\nQuestion: {self.text(row, 'question')}?\nAnswer:"
        return Example(prompt, list(self.verbalizer.values()), self.gold(row))
