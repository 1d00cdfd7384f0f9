"""The 4-bit layer kinds by ``--quant`` name: adding a format is one layer file plus one entry here.

Every list of allowed ``--quant`` values is :data:`QUANT_TYPES`; "is this a 4-bit layer" is
``isinstance(m, QUANT_LAYERS)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import SparseZOError
from .int4 import GROUP, Int4Linear
from .nf4 import NF4Linear

QUANT_FILE = "sparsezo_quant.json"
FORMAT = "sparsezo.nf4/1"
FORMATS = {"nf4": FORMAT, "int4": "sparsezo.int4/1"}
QUANT_TYPES = tuple(FORMATS)
QUANT_LAYERS = (NF4Linear, Int4Linear)  # isinstance() of "a 4-bit layer" (export, fingerprints, masks)


def new_layer(quant: str, in_features: int, out_features: int, dtype: torch.dtype, k: int, bias: bool,
              nested: bool = True) -> nn.Module:
    """An empty 4-bit layer of kind ``quant`` (``nested``: NF4's double quantization)."""
    if quant == "nf4":
        return NF4Linear(in_features, out_features, dtype, k, nested, bias)
    if quant == "int4":
        return Int4Linear(in_features, out_features, dtype, k, GROUP, bias)
    raise SparseZOError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")


def layer_bytes(quant: str, numel: int, k: int) -> int:
    """Bytes a 4-bit layer of ``numel`` weights with ``k`` exact entries holds (bf16 compute dtype)."""
    if quant == "int4":  # codes + bf16 scale and zero per group + index, value and 4-bit value per entry
        return numel // 2 + numel // GROUP * 4 + 14 * k
    return numel // 2 + numel // 64 + 10 * k


def from_linear(quant: str, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor | None,
                 dtype: torch.dtype, nested: bool) -> nn.Module:
    """A 4-bit layer of kind ``quant`` holding ``weight`` (its ``idx`` entries exact)."""
    if quant == "nf4":
        return NF4Linear.from_linear(weight, bias, idx, dtype, nested)
    if quant == "int4":
        return Int4Linear.from_linear(weight, bias, idx, dtype, GROUP)
    raise SparseZOError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")


def quant_kind(layer: nn.Module) -> str:
    """The ``--quant`` value a 4-bit layer was built with."""
    return "int4" if isinstance(layer, Int4Linear) else "nf4"


def skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model's modules with parameters on the meta device (buffers real), no weights loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by ``save_quantized``/``quantize_folder`` (its quantization record is there)."""
    return (Path(folder) / QUANT_FILE).is_file()
