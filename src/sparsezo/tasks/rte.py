"""RTE (SuperGLUE): does the premise entail the hypothesis? MeZO's yes/no question template.

Asking whether the quoted hypothesis "is true" given the text turns entailment into a
question a language model has seen countless times; the ``Answer:`` cue makes the
one-word completion `` Yes``/`` No`` the natural next token.
"""

from __future__ import annotations

from ..assets import assets_dir
from .base import Example, Task, superglue_pools


class RTE(Task):
    name = "rte"
    verbalizer = {"entailment": " Yes", "not_entailment": " No"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "RTE"
        return superglue_pools(root, ["premise", "hypothesis", "label"])

    def format(self, row: dict) -> Example:
        premise, hypothesis = self.text(row, "premise"), self.text(row, "hypothesis")
        prompt = f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\nAnswer:'
        return Example(prompt, list(self.verbalizer.values()), self.gold(row))
