"""Merge a delta into its base and export a plain Hugging Face folder that ``transformers`` loads.

A fine-tune trained over a 4-bit base is exported with the weights it was trained against:
each 4-bit layer becomes a dense ``nn.Linear`` holding its dequantized weight with the trained
entries written in, so the export computes exactly what sparsezo computed in memory.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .io import atomic_dir
from .quant import NF4Linear


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`NF4Linear` by an ``nn.Linear`` with the same effective weight (in place)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, NF4Linear):
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.dtype, device=m.codes.device)
        lin.weight.copy_(m.dequantized())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        lin.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    if hasattr(model, "sparsezo_quant"):
        del model.sparsezo_quant
    return model


def save_merged(model: nn.Module, tokenizer, out: str | os.PathLike) -> None:
    """Write ``model`` (a delta already applied) as safetensors + config + tokenizer, atomically."""
    dequantize_model(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
