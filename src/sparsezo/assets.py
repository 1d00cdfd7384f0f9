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
    """The assets folder, or ``None``/an error when none of the known locations exists."""
    env = os.environ.get("SPARSEZO_ASSETS")
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared" / "assets", _REPO_ROOT.parent / "shared" / "assets"]
    for c in candidates:
        if c.is_dir():
            return c
    if required:
        raise SparseZOError(
            f"shared assets not found (looked in {', '.join(map(str, candidates))}); "
            "set SPARSEZO_ASSETS to the folder holding data/ and calibration/, or pass --data-dir"
        )
    return None


def default_calibration_file() -> Path:
    """WikiText-2 raw test text, SensZOQ-style pre-training-like calibration data."""
    return assets_dir() / "calibration" / "wikitext2_raw_test.txt"
