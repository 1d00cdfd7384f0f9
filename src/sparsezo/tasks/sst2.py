"""SST-2 (GLUE): binary sentiment, MeZO's template ``<sentence> It was great|terrible``."""

from __future__ import annotations

from ..assets import assets_dir
from ..errors import SparseZOError
from .base import Example, Task, read_tsv


class SST2(Task):
    name = "sst2"
    words = (" terrible", " great")  # label 0 = negative, 1 = positive

    def load_pools(self):
        root = self.data_dir or assets_dir() / "data" / "glue" / "SST-2"
        train = read_tsv(root / "train.tsv", ["label", "sentence"])
        # GLUE's dev file is the test set here (MeZO protocol); its text column is named "content".
        test = read_tsv(root / "dev.tsv", ["label"])
        for row in test:
            row.setdefault("sentence", row.get("content"))
        return train, test

    def format(self, row: dict) -> Example:
        try:
            label = int(row["label"])
            sentence = row["sentence"].strip()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SparseZOError(f"sst2: malformed row {row!r} ({e}); expected a 0/1 label and a sentence") from e
        if label not in (0, 1):
            raise SparseZOError(f"sst2: label {label} is not 0 or 1 in row {row!r}")
        return Example(f"{sentence} It was", list(self.words), label)
