"""COPA (SuperGLUE): which of two choices is the cause (or effect) of the premise?

No question is asked: the premise, without its final period, is joined to each choice by
" because" (cause) or " so" (effect) and the model scores the two resulting sentences, as in
MeZO. Each choice's first letter is lower-cased to continue the sentence (except the pronoun
"I"); its final period is kept.
"""

from __future__ import annotations

import re

from ..assets import assets_dir
from ..errors import SparseZOError
from .base import Example, Task, superglue_pools


class COPA(Task):
    name = "copa"
    connectors = {"cause": " because", "effect": " so"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "COPA"
        return superglue_pools(root, ["premise", "choice1", "choice2", "question", "label"])

    def format(self, row: dict) -> Example:
        question, label, where = row.get("question"), row.get("label"), f"copa: row idx={row.get('idx')} field"
        if question not in ("cause", "effect"):
            raise SparseZOError(f"{where} 'question' is {question!r}, not 'cause' or 'effect'")
        if label not in (0, 1):
            raise SparseZOError(f"{where} 'label' is {label!r}, not 0 (choice1) or 1 (choice2)")
        premise = self.text(row, "premise").removesuffix(".")
        choices = [self.text(row, "choice1"), self.text(row, "choice2")]
        cands = [" " + (c if re.match(r"I\b", c) else c[0].lower() + c[1:]) for c in choices]
        return Example(premise + self.connectors[question], cands, int(label))
