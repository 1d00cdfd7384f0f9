"""The demo's data, shipped inside the package, so ``sparsezo demo`` runs on a machine with nothing else.

A fresh clone or a ``pip install`` has no shared assets folder, and the demo is the one job that
must run there. So the package carries exactly what :data:`sparsezo.DEMO` reads (files in
``demo_data/``, licences and attribution in its ``NOTICE.md``):

- the SST-2 training rows the demo samples for seeds 0, 1 and 2 — the first ``num_train + num_dev``
  of each seed's permutation of the 67,349-row pool — stored with their row numbers in the full
  file and the pool's size, so :meth:`Task.splits` draws the same permutation and picks the same
  rows: the demo gives bit-identical results with or without the assets;
- GLUE's SST-2 dev file (872 rows), the demo's test split, as is;
- the first lines of WikiText-2 (raw test), more than the demo's 8,192 calibration tokens (the
  Fisher score reads the *first* tokens of the file, so a prefix gives the same rows).

Every other task, and the demo with another seed or more data, reads the full files from
``$SPARSEZO_ASSETS``. :func:`build_demo_data` regenerates the folder from those files (the tests
check that it reproduces the packaged bytes).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path

import numpy as np

from ..assets import assets_dir
from ..errors import SparseZOError
from ..io import write_json, write_text
from .base import Task, read_tsv
from .sst2 import SST2

log = logging.getLogger(__name__)

SEEDS = (0, 1, 2)
CALIB_CHARS = 51_200  # WikiText-2 characters kept (then to the end of that line): ~12,300 SmolLM2 tokens
_SST2 = ("data", "glue", "SST-2")
_CALIB = ("calibration", "wikitext2_raw_test.txt")


def demo_data_dir() -> Path:
    """The packaged folder (inside the installed package or the source tree)."""
    return Path(str(files("sparsezo.tasks") / "demo_data"))


def manifest() -> dict:
    """What the folder holds: pool size, seeds and sizes the rows cover, the calibration budget."""
    return json.loads((demo_data_dir() / "manifest.json").read_text(encoding="utf-8"))


class SparsePool(Sequence):
    """The SST-2 training pool as :meth:`Task.splits` sees it: its full length, but only the stored rows.

    ``splits`` permutes ``range(len(pool))`` and indexes the permutation's first rows; a row the
    package does not hold means a seed or size the embedded data was not built for.
    """

    def __init__(self, size: int, rows: dict[int, dict]):
        self.size, self.rows = size, rows

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):  # an int: Task.splits indexes one row at a time
        try:
            return self.rows[int(i)]
        except KeyError:
            raise SparseZOError(f"SST-2 training row {i} is not in the embedded demo data; set SPARSEZO_ASSETS to "
                                "the folder holding data/glue/SST-2 for other seeds or sizes") from None

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(self.size))


class EmbeddedSST2(SST2):
    """SST-2 read from the packaged demo subset instead of the full GLUE files."""

    def load_pools(self):
        meta, root = manifest(), demo_data_dir()
        stored = read_tsv(root / "sst2_train.tsv", ["idx", "label", "sentence"])
        rows = {int(r.pop("idx")): r for r in stored}
        test = read_tsv(root / "sst2_dev.tsv", ["label", "content"])
        for row in test:
            row.setdefault("sentence", row.get("content"))
        return SparsePool(meta["pool_size"], rows), test

    def splits(self, seed: int = 0, num_train: int = 1000, num_dev: int = 500, num_test: int = 1000):
        meta = manifest()
        if seed not in meta["seeds"] or num_train + num_dev > meta["num_train"] + meta["num_dev"]:
            raise SparseZOError(
                f"the embedded demo data holds SST-2 for seeds {', '.join(map(str, meta['seeds']))} and up to "
                f"{meta['num_train']} train + {meta['num_dev']} dev examples, not seed {seed} with {num_train} + "
                f"{num_dev}; set SPARSEZO_ASSETS to the folder holding data/glue/SST-2")
        return super().splits(seed, num_train, num_dev, num_test)


def demo_task() -> Task:
    """SST-2 from the shared assets when they exist, else from the packaged subset."""
    if assets_dir(required=False) is not None:
        return SST2()
    log.info("shared assets not found; the demo uses the SST-2 subset packaged with sparsezo")
    return EmbeddedSST2()


def demo_calibration_file(calib_tokens: int) -> Path:
    """WikiText-2 from the shared assets when they exist, else the packaged excerpt (which covers the
    demo's budget only: asking it for more tokens would silently compute the score on fewer)."""
    root = assets_dir(required=False)
    if root is not None:
        return root.joinpath(*_CALIB)
    budget = manifest()["calib_tokens"]
    if calib_tokens > budget:
        raise SparseZOError(f"--calib-tokens {calib_tokens}: the packaged WikiText-2 excerpt covers the demo's "
                            f"{budget}; set SPARSEZO_ASSETS to the folder holding {'/'.join(_CALIB)} for more")
    return demo_data_dir() / "wikitext2_excerpt.txt"


def build_demo_data(assets: Path, out: Path, num_train: int, num_dev: int, calib_tokens: int) -> None:
    """Write the packaged folder's data files from the full assets (``NOTICE.md`` is kept by hand)."""
    sst2 = assets.joinpath(*_SST2)
    pool = read_tsv(sst2 / "train.tsv", ["label", "sentence"])
    first = num_train + num_dev  # the rows Task.splits takes from each seed's permutation
    keep = sorted({int(i) for s in SEEDS for i in np.random.default_rng(s).permutation(len(pool))[:first]})
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "sst2_train.tsv", "idx\tlabel\tsentence\n"
               + "".join(f"{i}\t{pool[i]['label']}\t{pool[i]['sentence']}\n" for i in keep))
    shutil.copyfile(sst2 / "dev.tsv", out / "sst2_dev.tsv")
    raw = assets.joinpath(*_CALIB).read_text(encoding="utf-8")
    write_text(out / "wikitext2_excerpt.txt", raw[: raw.index("\n", CALIB_CHARS) + 1])
    write_json(out / "manifest.json", {"pool_size": len(pool), "seeds": list(SEEDS), "num_train": num_train,
                                       "num_dev": num_dev, "rows": len(keep), "calib_tokens": calib_tokens,
                                       "calib_chars": CALIB_CHARS})
