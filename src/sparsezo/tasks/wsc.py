"""WSC (SuperGLUE): does the pronoun (span2) refer to the candidate noun phrase (span1)?

SuperGLUE casts the Winograd schema as a binary coreference decision, so the prompt asks it
directly right after the sentence, quoting the pronoun so it cannot be confused with the
surrounding text.
"""

from __future__ import annotations

from ..assets import assets_dir
from .base import Example, Task, superglue_pools


class WSC(Task):
    name = "wsc"
    verbalizer = {True: " Yes", False: " No"}

    def load_pools(self) -> tuple[list[dict], list[dict]]:
        root = self.data_dir or assets_dir() / "data" / "superglue" / "WSC"
        return superglue_pools(root, ["text", "target", "label"])

    def format(self, row: dict) -> Example:
        noun, pronoun = self.text(row, "target.span1_text"), self.text(row, "target.span2_text")
        prompt = (f'{self.text(row, "text")}\nIn the previous sentence, does the pronoun "{pronoun}" refer to '
                  f"{noun}? Yes or No?\nAnswer:")
        return Example(prompt, list(self.verbalizer.values()), self.gold(row))
