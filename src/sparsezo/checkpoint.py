"""The fine-tune file: ``delta.safetensors`` holds the trained values and their indices only.

Layout: ``<tensor>.indices`` (sorted flat int indices; absent for fully-trained tensors) and
``<tensor>.values`` (fp32) per trainable tensor, with the mask's provenance and the base
model's fingerprint in the header. A 0.1% delta of a 7B model is ~52 MB; of SmolLM2 ~1 MB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import SparseZOError
from .io import load_tensors, save_tensors
from .masks import Mask
from .zo import TrainableParams

FORMAT = "sparsezo.delta/1"


@dataclass
class Delta:
    """Trained values over a mask; ``apply`` writes them into a base model."""

    mask: Mask
    values: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @classmethod
    def from_params(cls, params: TrainableParams, meta: dict[str, Any] | None = None) -> "Delta":
        return cls(params.mask, {n: v.detach().clone() for n, v in params.state().items()}, dict(meta or {}))

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for name, v in self.values.items():
            idx = self.mask.indices[name]
            if idx is not None:
                tensors[f"{name}.indices"] = idx.to(torch.int64)
            tensors[f"{name}.values"] = v.float()
        meta = dict(self.meta, format=FORMAT, mask={k: v for k, v in self.mask.meta.items()},
                    shapes={n: list(s) for n, s in self.mask.shapes.items()})
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Delta":
        tensors, meta = load_tensors(path, "delta")
        if meta.get("format") != FORMAT:
            raise SparseZOError(f"{path} has format {meta.get('format')!r}, expected a sparsezo delta ({FORMAT})")
        shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        indices, values = {}, {}
        for name in shapes:
            if f"{name}.values" not in tensors:
                raise SparseZOError(f"delta {path} lacks values for {name}; the file is corrupt")
            values[name] = tensors[f"{name}.values"]
            idx = tensors.get(f"{name}.indices")
            indices[name] = None if idx is None else idx.to(torch.int64)
        mask = Mask(indices, shapes, meta.get("mask", {}))
        return cls(mask, values, {k: v for k, v in meta.items() if k not in ("mask", "shapes", "format")})

    def apply(self, model: nn.Module) -> "AppliedDelta":
        """Write the trained values into ``model`` (checked against its fingerprint); undo with ``remove``."""
        params = TrainableParams(model, self.mask)
        base = params.theta.clone()
        params.load_values(self.values)
        return AppliedDelta(params, base)


@dataclass
class AppliedDelta:
    """A delta written into a model, with the base values it replaced."""

    params: TrainableParams
    base: torch.Tensor

    def remove(self) -> None:
        """Restore the base weights bit-identically."""
        self.params.theta.copy_(self.base)
        self.params.restore()


def load_delta(path: str | os.PathLike) -> Delta:
    """Load a delta from a file or from a run directory holding ``delta.safetensors``."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "delta.safetensors")
    return Delta.load(p)
