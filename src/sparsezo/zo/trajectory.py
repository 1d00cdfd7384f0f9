"""The seed trajectory: a whole ZO fine-tune as (seed, projected gradient, lr) per step.

A ZO run is fully determined by the base model, the mask, the optimiser settings and, per
step, the q seeds and q scalars the forwards measured: z is regenerated from each seed, so
replaying the updates rebuilds θ bit-identically without any data or forward pass. That is
24 bytes a step (int64 seed, float64 gradient, float64 lr) — a 1000-step fine-tune is ~24 KB.

Gradients and learning rates are float64 because that is what the update computes with
(Python floats); anything narrower would break bit-identity.

Format 2 adds ``curvs`` (per step and query, the curvature (L+ + L− − 2·L(θ))/ε² that the
``hizoo`` optimiser's state is built from). It is written only by runs that record curvatures;
every other run still writes format 1 byte for byte as before, so older sparsezo versions keep
reading them, and format-1 files load here unchanged.

The ZO settings (``zo`` in the header) hold the noise version (``noise``, zo/noise.py); a file
written before version 2 has none and loads as version 1, so it replays with the generator and
update arithmetic it was trained with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..errors import SparseZOError
from ..io import check_values, json_field, load_tensors, save_tensors
from .spsa import StepRecord, ZOConfig, ZOEngine
from .trainable import TrainableParams

FORMAT_V1 = "sparsezo.trajectory/1"
FORMAT = "sparsezo.trajectory/2"  # = format 1 + "curvs"


@dataclass
class Trajectory:
    """Per-step seeds, projected gradients and learning rates, plus what they apply to."""

    seeds: list[list[int]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    curvs: list[list[float]] = field(default_factory=list)  # one row per step, or none at all

    def __len__(self) -> int:
        return len(self.lrs)

    def append(self, rec: StepRecord) -> None:
        if rec.step != len(self):
            raise SparseZOError(f"trajectory has {len(self)} steps, cannot append step {rec.step}")
        if len(self) and (rec.curvs is not None) != bool(self.curvs):  # all steps record curvatures, or none
            raise SparseZOError(f"step {rec.step} {'lacks' if rec.curvs is None else 'adds'} curvatures the "
                                "trajectory's other steps " + ("have" if rec.curvs is None else "lack"))
        if rec.curvs is not None:
            self.curvs.append(list(rec.curvs))
        self.seeds.append(list(rec.seeds))
        self.grads.append(list(rec.grads))
        self.lrs.append(rec.lr)

    def tensors(self) -> dict[str, torch.Tensor]:
        q = len(self.seeds[0]) if self.seeds else 0
        out = {
            "seeds": torch.tensor(self.seeds, dtype=torch.int64).reshape(len(self), q),
            "grads": torch.tensor(self.grads, dtype=torch.float64).reshape(len(self), q),
            "lrs": torch.tensor(self.lrs, dtype=torch.float64),
        }
        if self.curvs:
            out["curvs"] = torch.tensor(self.curvs, dtype=torch.float64).reshape(len(self), q)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> "Trajectory":
        curvs = tensors["curvs"].tolist() if "curvs" in tensors else []
        return cls(tensors["seeds"].tolist(), tensors["grads"].tolist(), tensors["lrs"].tolist(), dict(meta or {}),
                   curvs)

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, self.tensors(), dict(self.meta, format=FORMAT if self.curvs else FORMAT_V1))

    @classmethod
    def checked(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> "Trajectory":
        """A trajectory from stored tensors after validating them (``where`` names the file in errors).

        Replay trusts every number here: fewer seed rows than steps, a NaN gradient or a negative
        lr would crash it or write a NaN delta, so each is an error naming the field.
        """
        missing = {"seeds", "grads", "lrs"} - set(tensors)
        if missing:
            raise SparseZOError(f"{where} lacks {sorted(missing)}; the file is corrupt")
        seeds, grads = tensors["seeds"], tensors["grads"]
        if seeds.dtype != torch.int64 or seeds.dim() != 2 or (seeds.shape[0] and seeds.shape[1] < 1):
            raise SparseZOError(f"{where}: seeds is {str(seeds.dtype).removeprefix('torch.')} {list(seeds.shape)}, "
                                "expected int64 [steps, q]; the file is corrupt")
        steps, q = seeds.shape
        lrs = check_values(tensors["lrs"], f"{where}: lrs", (torch.float64,))
        if lrs.dim() != 1:
            raise SparseZOError(f"{where}: lrs has shape {list(lrs.shape)}, expected one value per step")
        if lrs.numel() != steps:
            raise SparseZOError(f"{where}: seeds holds {steps} steps but lrs {lrs.numel()} learning rates; "
                                "the file is corrupt")
        check_values(grads, f"{where}: grads", (torch.float64,), shape=(steps, q) if steps else None)
        if "curvs" in tensors:
            check_values(tensors["curvs"], f"{where}: curvs", (torch.float64,), shape=(steps, q) if steps else None)
        if (lrs < 0).any():
            raise SparseZOError(f"{where}: lrs holds negative learning rates; the file is corrupt")
        if "zo" in meta:
            zo = json_field(meta, "zo", dict, where)
            # written before noise version 2: replayed with the generator and arithmetic it was trained with
            zo.setdefault("noise", 1)
            unknown = sorted(set(zo) - {f.name for f in fields(ZOConfig)})
            if unknown:
                raise SparseZOError(f"{where}: zo settings have unknown key(s) {unknown}; written by another version?")
            for f in fields(ZOConfig):
                if f.name in zo and not _is_type(zo[f.name], type(f.default)):
                    raise SparseZOError(f"{where}: zo setting {f.name!r} is {zo[f.name]!r}, expected type "
                                        f"{type(f.default).__name__}; the file is corrupt")
            ZOConfig(**zo).validate()
        best = json_field(meta, "best_step", int, where, optional=True)
        if best is not None and not 0 <= best <= steps:
            raise SparseZOError(f"{where}: best_step {best} is outside 0..{steps} (the trajectory holds {steps} steps)")
        for key in ("dtype", "mask_digest"):
            json_field(meta, key, str, where, optional=True)
        json_field(meta, "delta_meta", dict, where, optional=True)
        return cls.from_tensors(tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        tensors, meta = load_tensors(path, "trajectory")
        fmt = meta.get("format")
        if fmt not in (FORMAT_V1, FORMAT):
            raise SparseZOError(f"{path} has format {fmt!r}, expected a sparsezo trajectory ({FORMAT_V1} or {FORMAT})")
        if (fmt == FORMAT) != ("curvs" in tensors):
            raise SparseZOError(f"{path}: format {fmt} {'lacks' if fmt == FORMAT else 'must not hold'} 'curvs'; "
                                "the file is corrupt")
        meta.pop("format")
        return cls.checked(tensors, meta, f"trajectory {path}")

    def replay(self, params: TrainableParams, cfg: ZOConfig, steps: int | None = None, progress=None) -> None:
        """Apply the first ``steps`` (default: all) updates to ``params``, which must start at the base θ.

        Runs the exact update code of training (:meth:`ZOEngine.apply`), so optimiser state
        (momentum, Adam moments) is rebuilt along the way and the result is bit-identical.
        ``progress`` (a tqdm-like object) is advanced by one per step: on a large θ (millions
        of entries) regenerating z dominates and a replay can take minutes.
        """
        steps = len(self) if steps is None else steps
        if steps > len(self):
            raise SparseZOError(f"cannot replay {steps} steps: the trajectory holds {len(self)}")
        engine = ZOEngine(params, cfg, max(steps, 1), cache_bytes=0)
        if engine.opt.uses_curvature and steps and not self.curvs:
            raise SparseZOError(f"optimizer {cfg.optimizer!r} needs the per-step curvatures, and this trajectory "
                                "records none (it was not trained with that optimizer)")
        for t in range(steps):
            curvs = self.curvs[t] if engine.opt.uses_curvature else None
            engine.apply(t, self.seeds[t], self.grads[t], self.lrs[t], curvs)
            if progress is not None:
                progress.update(1)


def _is_type(value: Any, expected: type) -> bool:
    """JSON's view of a dataclass field's type: an int is a valid float, a bool is never a number."""
    if isinstance(value, bool) and expected is not bool:
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)
