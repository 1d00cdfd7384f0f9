"""CommitmentBank (SuperGLUE): three-way entailment, asked like RTE with a third answer.

The question is RTE's, with "Maybe" offered for the neutral class so that all three
verbalizers appear in the prompt before the model has to pick one of them.
"""

from __future__ import annotations

from ..assets import assets_dir
from .base import Example, Task, superglue_pools


class CB(Task):
    name = "cb"
    verbalizer = {"entailment": " Yes", "contradiction": " No", "neutral": " Maybe"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "CB"
        return superglue_pools(root, ["premise", "hypothesis", "label"])

    def format(self, row: dict) -> Example:
        premise, hypothesis = self.text(row, "premise"), self.text(row, "hypothesis")
        prompt = f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes, No, or Maybe?\nAnswer:'
        return Example(prompt, list(self.verbalizer.values()), self.gold(row))
