"""Memory and disk a model needs, estimated from its safetensors headers (nothing loaded)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..quant.layers import is_quantized_folder, layer_bytes
from .params import DTYPES
from .paths import default_model_folder
from .resolve import resolve_model_path
from .shards import tensor_shapes

_RUNTIME_BYTES = 600 * 2**20  # torch + transformers + tokenizer, measured ~0.5 GiB on CPU


def resident_bytes(folder: str | os.PathLike, dtype: str = "bfloat16", quant: str | None = None, mask=None) -> int:
    """Anonymous memory a loaded model holds, estimated from the safetensors headers.

    Tensors already in ``dtype`` stay mmap views of the checkpoint (page cache, evictable) and
    count nothing; cast tensors count in full; 4-bit layers count their codes, scales and exact
    entries (~0.53 bytes a weight + 10 per exact entry for nf4, ~0.56 + 14 for int4); a quantized
    folder is copied in whole.
    """
    folder = Path(folder)
    target = str(DTYPES[dtype]).removeprefix("torch.")
    short = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[target]
    quantized = is_quantized_folder(folder)
    total = _RUNTIME_BYTES
    for name, (shape, st_dtype) in tensor_shapes(folder).items():
        n = int(torch.Size(shape).numel())
        if quant and mask is not None and name in mask.indices:
            idx = mask.indices[name]
            total += layer_bytes(quant, n, 0 if idx is None else idx.numel())
        elif quantized or st_dtype != short:
            total += n * (DTYPES[dtype].itemsize if not quantized else _ST_BYTES.get(st_dtype, 4))
    return total


_ST_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "F64": 8}


def checkpoint_bytes(path: str | os.PathLike | None, dtype: str = "bfloat16") -> int:
    """Bytes of a model folder's weights held in ``dtype`` (from the safetensors headers; nothing loaded)."""
    numel = sum(int(torch.Size(shape).numel()) for shape, _ in tensor_shapes(resolve_model_path(path)).values())
    return numel * DTYPES[dtype].itemsize


def model_numel(model: str | os.PathLike | None) -> int | None:
    """Weights of a model folder (``None``: the default model), from its safetensors headers; None if unknown here."""
    folder = Path(model) if model else default_model_folder()
    total = 0
    try:
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    total += math.prod(st.get_slice(k).get_shape())
    except Exception:  # an unreadable model is reported by the model load itself, with its own message
        return None
    return total or None
