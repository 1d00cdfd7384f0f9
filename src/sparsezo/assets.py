"""Where the shared real data lives: ``$SPARSEZO_ASSETS``, else ``../shared/assets`` of the project.

The data is never copied into the repository or downloaded; callers get a clear error
(and tests skip) when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SparseZOError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def assets_dir(required: bool = True) -> Path | None:
    """The assets folder, or ``None``/an error when none of the known locations exists.

    ``$SPARSEZO_ASSETS``, when set, is the only place looked at (so a test can hide ``../shared``).
    The error names each place once: run from the project root, both defaults are the same folder.
    """
    env = os.environ.get("SPARSEZO_ASSETS")
    candidates = [Path(env)] if env else list(dict.fromkeys(
        [(Path.cwd().parent / "shared" / "assets").resolve(), (_REPO_ROOT.parent / "shared" / "assets").resolve()]))
    for c in candidates:
        if c.is_dir():
            return c
    if required:
        where = f"SPARSEZO_ASSETS={env} is not a folder" if env else f"not found in {', '.join(map(str, candidates))}"
        raise SparseZOError(f"shared assets {where}; set SPARSEZO_ASSETS to the folder holding data/ and "
                            "calibration/, or pass --data-dir")
    return None


def default_calibration_file() -> Path:
    """WikiText-2 raw test text, SensZOQ-style pre-training-like calibration data."""
    return assets_dir() / "calibration" / "wikitext2_raw_test.txt"
