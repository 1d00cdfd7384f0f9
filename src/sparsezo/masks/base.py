"""The mask object, its file format, and exact top-k selection shared by score-based rules.

A mask maps each trainable tensor name to the sorted flat indices of its trainable entries
(``None`` = the whole tensor, used by the ``full`` rule so that the MeZO baseline never
materialises billions of indices). It is saved as ``mask.safetensors``: one int32/int64
tensor per name, plus JSON metadata in the header (rule, density, scope, calibration source,
model fingerprint, shapes).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SparseZOError
from ..io import check_indices, json_field, load_tensors, save_tensors
from ..model.params import check_fingerprint, logical_tensors
from .topk import TopK, exact_count  # noqa: F401 (exact_count is part of this module's API)

FORMAT = "sparsezo.mask/1"


@dataclass
class Mask:
    """Trainable entries per tensor, in model order, with provenance metadata."""

    indices: dict[str, torch.Tensor | None]
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # timings/memory of the computation; not saved

    @property
    def rule(self) -> str:
        return self.meta.get("rule", "?")

    @property
    def num_trainable(self) -> int:
        return sum(numel(self.shapes[n]) if i is None else i.numel() for n, i in self.indices.items())

    @property
    def num_eligible(self) -> int:
        return sum(numel(s) for s in self.shapes.values())

    @property
    def is_full(self) -> bool:
        return all(i is None for i in self.indices.values())

    def digest(self) -> str:
        """A hash of the selected entries (names, shapes, indices): which weights train, nothing else."""
        h = hashlib.sha256()
        for name in sorted(self.indices):  # file order (sorted) and model order hash alike
            idx = self.indices[name]
            h.update(f"{name}:{list(self.shapes[name])}:".encode())
            h.update(b"all" if idx is None else idx.to(torch.int64).cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mask.safetensors`` atomically (int32 indices when they fit)."""
        tensors = {}
        for name, idx in self.indices.items():
            if idx is not None:
                tensors[name] = idx.to(index_dtype(self.shapes[name]))
        meta = dict(self.meta, format=FORMAT, shapes={n: list(s) for n, s in self.shapes.items()},
                    full_tensors=[n for n, i in self.indices.items() if i is None])
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Read and validate a mask file: header fields, index dtype/rank/range/order/uniqueness, a non-empty set.

        A mask file is user input; what it selects is trained, so nothing in it is coerced
        (float indices truncated, duplicates kept) or accepted empty.
        """
        tensors, meta = load_tensors(path, "mask")
        where = f"mask file {path}"
        if meta.get("format") != FORMAT:
            raise SparseZOError(f"{where} has format {meta.get('format')!r}, expected {FORMAT!r}")
        shapes = shapes_from_meta(meta, where)
        full = json_field(meta, "full_tensors", list, where, optional=True) or []
        unknown = sorted({str(n) for n in full} - set(shapes)) + sorted(set(tensors) - set(shapes))
        if unknown:
            raise SparseZOError(f"{where} names tensor(s) {unknown[:3]} that are not in its shapes; the file is corrupt")
        indices: dict[str, torch.Tensor | None] = {}
        for name in shapes:  # metadata order = model order
            if name in full:
                indices[name] = None
                continue
            if name not in tensors:
                raise SparseZOError(f"{where} lacks indices for {name}; the file is corrupt, re-create it")
            indices[name] = check_indices(tensors[name], numel(shapes[name]), f"{where}: {name}")
        mask = cls(indices, shapes, {k: v for k, v in meta.items() if k not in ("shapes", "full_tensors", "format")})
        if mask.num_trainable == 0:
            raise SparseZOError(f"{where} selects 0 trainable entries: nothing would train; recompute it with a "
                                "larger --density")
        recorded = mask.meta.get("num_trainable")
        if recorded is not None and recorded != mask.num_trainable:
            raise SparseZOError(f"{where} holds {mask.num_trainable} entries, its header says {recorded}; "
                                "the file was altered, re-create it")
        return mask

    def check_model(self, model: nn.Module, what: str = "mask") -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Where each masked tensor's trainable entries live in ``model``, or an error naming the mismatch.

        Returns name → (storage, flat indices into it, or None for all of it): the weight itself
        for a dense layer, the exact-values vector of a 4-bit layer built for this mask.
        """
        tensors = logical_tensors(model)
        for name, shape in self.shapes.items():
            if name not in tensors:
                raise SparseZOError(f"{what} names tensor {name}, which this model does not have; it was made for another model")
            if tensors[name].shape != shape:
                raise SparseZOError(f"{what} expects {name} of shape {shape}, the model has {tensors[name].shape}")
        if "fingerprint" in self.meta:
            check_fingerprint(self.meta["fingerprint"], model, what)
        targets = {}
        for name in [n for n in tensors if n in self.indices]:  # model order, however the mask was obtained
            idx, t = self.indices[name], tensors[name]
            if t.param is not None:
                targets[name] = (t.param.data, idx)
                continue
            if idx is None or not torch.equal(t.module.idx, idx.to(t.module.idx.device)):
                raise SparseZOError(
                    f"the 4-bit layer {name} keeps exact values for another set of entries than this {what}; "
                    "quantize the base with this mask (or use the mask the quantized model was built with)"
                )
            targets[name] = (t.module.values, None)
        return targets


@dataclass
class MaskContext:
    """What a rule may need besides the density: the model, its eligible tensors, and data."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    scope: str = "global"
    seed: int = 0
    tokenizer: Any = None
    texts: list[str] | None = None  # calibration text (sensitive) or task text (sensitive-task)
    calib_tokens: int = 32768
    seq_len: int = 256
    micro_batch: int = 8
    memory_limit: int | None = None  # bytes the Fisher computation may use (None: what is available)
    score_memory: int | None = None  # bytes for Fisher score buffers (None: what memory_limit leaves)
    info: dict[str, Any] = field(default_factory=dict)  # provenance rules record (saved with the mask)
    stats: dict[str, Any] = field(default_factory=dict)  # timings rules record (reported, not saved)


def shapes_from_meta(meta: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` field of a mask/delta header ({name: [dims]}), checked: non-negative int dims."""
    shapes = json_field(meta, "shapes", dict, where)
    if not shapes:
        raise SparseZOError(f"{where}: field 'shapes' is empty; the file is corrupt, re-create it")
    out = {}
    for name, dims in shapes.items():
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in dims):
            raise SparseZOError(f"{where}: shape of {name} is {dims!r:.60}, expected a list of sizes; re-create the file")
        out[name] = tuple(dims)
    return out


def index_dtype(shape: tuple[int, ...] | list[int]) -> torch.dtype:
    """The dtype flat indices into a tensor of ``shape`` are stored in: int32 when it fits (half the bytes)."""
    return torch.int32 if numel(shape) < 2**31 else torch.int64


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def select_top(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Sorted flat indices of the highest scores: k = round(density × N) globally, or per tensor.

    Exact count, ties broken by model order then index order (see :mod:`.topk`); global
    selection never sorts all scores at once.
    """
    top = TopK({n: s.numel() for n, s in scores.items()}, density, scope)
    for name, s in scores.items():
        top.offer(name, s)
    return top.indices()
