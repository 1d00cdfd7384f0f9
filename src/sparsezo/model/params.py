"""The weights a mask may select from, and the fingerprints that tie a mask or delta to its model."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import SparseZOError
from ..quant.layers import QUANT_LAYERS, skeleton
from .shards import checkpoint_files

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Decoder-layer linear weights: attention and MLP projections (SensZOQ's eligible set).
DEFAULT_INCLUDE = r"(^|\.)(layers|h|blocks)\.\d+\..*(attn|attention|mlp)\b.*\.weight$"


def eligible_parameters(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> dict[str, nn.Parameter]:
    """Parameters a mask may select from, in model order.

    Default: decoder-layer attention/MLP linear weights (no embeddings, lm_head, norms or
    biases), as in SensZOQ. ``include``/``exclude`` are regular expressions on parameter names.
    """
    inc = re.compile(include or DEFAULT_INCLUDE)
    exc = re.compile(exclude) if exclude else None
    # Without an explicit include, only nn.Linear weights qualify (keeps e.g. q_norm out).
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not inc.search(name) or (exc and exc.search(name)):
            continue
        if include is None and id(p) not in linear:
            continue
        seen.add(id(p))
        out[name] = p
    if not out:
        raise SparseZOError(f"no parameter of the model matches include={inc.pattern!r} exclude={exclude!r}; fix the pattern")
    return out


@dataclass
class LogicalTensor:
    """A weight by its checkpoint name, whether stored densely (``param``) or 4-bit (``module``)."""

    shape: tuple[int, ...]
    head: torch.Tensor  # its first (up to) 64 entries, for fingerprints
    param: torch.Tensor | None = None
    module: nn.Module | None = None


def logical_tensors(model: nn.Module) -> dict[str, LogicalTensor]:
    """Every weight of ``model`` under its checkpoint name, in model order; a quantized layer's weight
    takes the place its dense weight had, so a model has one order whether quantized or not."""
    out: dict[str, LogicalTensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, QUANT_LAYERS):
            out[f"{prefix}weight"] = LogicalTensor((m.out_features, m.in_features), m.head, module=m)
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in seen:  # tied weights count once, under their first name (as named_parameters)
                seen.add(id(p))
                out[prefix + pname] = LogicalTensor(tuple(p.shape), p.detach().reshape(-1)[:64], param=p)
    return out


def model_fingerprint(model: nn.Module) -> dict:
    """Identify a model: weight names and shapes, plus a hash of a few weight values.

    Values are hashed after rounding to bfloat16, and quantized layers contribute the original
    values they kept, so one checkpoint gives one fingerprint in fp32, bf16 or NF4.
    """
    tensors = logical_tensors(model)
    return _fingerprint({n: t.shape for n, t in tensors.items()}, lambda n: tensors[n].head)


def _fingerprint(shapes: dict[str, tuple[int, ...]], head: Callable[[str], torch.Tensor]) -> dict:
    h = hashlib.sha256()
    names = sorted(shapes)
    for name in names:
        h.update(f"{name}:{shapes[name]};".encode())
    vh = hashlib.sha256()
    for name in names[:: max(1, len(names) // 8)]:
        vh.update(head(name).to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return {"shapes": h.hexdigest()[:16], "values": vh.hexdigest()[:16], "num_parameters": sum(
        int(torch.Size(s).numel()) for s in shapes.values())}


def checkpoint_fingerprint(folder: str | os.PathLike, dtype: str = "bfloat16", check: dict | None = None,
                           what: str = "mask") -> dict:
    """:func:`model_fingerprint` of the model a checkpoint folder loads as, from a weightless skeleton
    and the first entries of a few tensors (nothing else is read); ``check`` raises on a mismatch."""
    folder = Path(folder)
    skeleton_model = skeleton(folder, DTYPES[dtype])
    skeleton_model.tie_weights()  # as loading does: a tied head is the embedding, not a tensor of its own
    shapes = {n: tuple(p.shape) for n, p in _unique_parameters(skeleton_model)}
    where = {}
    for f in checkpoint_files(folder):
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})

    def head(name: str) -> torch.Tensor:
        if name not in where:
            raise SparseZOError(f"the checkpoint in {folder} lacks {name}; it is incomplete")
        with safe_open(str(where[name]), framework="pt") as st:
            sl = st.get_slice(name)
            shape = sl.get_shape()
            rows = -(-64 // max(1, int(torch.Size(shape[1:]).numel()))) if len(shape) > 1 else 64
            return sl[:rows].reshape(-1)[:64].to(DTYPES[dtype])

    got = _fingerprint(shapes, head)
    if check is not None:
        _compare_fingerprints(check, got, what)
    return got


def _unique_parameters(model: nn.Module):
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + pname, p


def check_fingerprint(expected: dict, model: nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (a mask or delta) was made for another model."""
    _compare_fingerprints(expected, model_fingerprint(model), what)


def _compare_fingerprints(expected: dict, got: dict, what: str) -> None:
    for key in ("shapes", "values"):
        if expected.get(key) != got[key]:
            kind = "parameter names/shapes" if key == "shapes" else "weight values"
            raise SparseZOError(
                f"{what} was made for a different model ({kind} differ: expected {expected.get(key)}, "
                f"this model has {got[key]}); use the model it was computed on or recompute it"
            )
