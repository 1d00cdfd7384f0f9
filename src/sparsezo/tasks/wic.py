"""WiC (SuperGLUE): is the target word used with the same sense in both sentences?

The question comes first so the model knows which word to track while reading the two
sentences, each on its own line; the ``Answer:`` cue then asks for `` Yes``/`` No``.
"""

from __future__ import annotations

from ..assets import assets_dir
from .base import Example, Task, superglue_pools


class WiC(Task):
    name = "wic"
    verbalizer = {True: " Yes", False: " No"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "WiC"
        return superglue_pools(root, ["word", "sentence1", "sentence2", "label"])

    def format(self, row: dict) -> Example:
        word, first, second = (self.text(row, k) for k in ("word", "sentence1", "sentence2"))
        prompt = (f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
                  f"{first}\n{second}\nAnswer:")
        return Example(prompt, list(self.verbalizer.values()), self.gold(row))
