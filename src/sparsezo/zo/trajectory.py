"""The seed trajectory: a whole ZO fine-tune as (seed, projected gradient, lr) per step.

A ZO run is fully determined by the base model, the mask, the optimiser settings and, per
step, the q seeds and q scalars the forwards measured: z is regenerated from each seed, so
replaying the updates rebuilds θ bit-identically without any data or forward pass. That is
24 bytes a step (int64 seed, float64 gradient, float64 lr) — a 1000-step fine-tune is ~24 KB.

Gradients and learning rates are float64 because that is what the update computes with
(Python floats); anything narrower would break bit-identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SparseZOError
from ..io import load_tensors, save_tensors
from .spsa import StepRecord, ZOConfig, ZOEngine
from .trainable import TrainableParams

FORMAT = "sparsezo.trajectory/1"


@dataclass
class Trajectory:
    """Per-step seeds, projected gradients and learning rates, plus what they apply to."""

    seeds: list[list[int]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lrs)

    def append(self, rec: StepRecord) -> None:
        if rec.step != len(self):
            raise SparseZOError(f"trajectory has {len(self)} steps, cannot append step {rec.step}")
        self.seeds.append(list(rec.seeds))
        self.grads.append(list(rec.grads))
        self.lrs.append(rec.lr)

    def tensors(self) -> dict[str, torch.Tensor]:
        q = len(self.seeds[0]) if self.seeds else 0
        return {
            "seeds": torch.tensor(self.seeds, dtype=torch.int64).reshape(len(self), q),
            "grads": torch.tensor(self.grads, dtype=torch.float64).reshape(len(self), q),
            "lrs": torch.tensor(self.lrs, dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> "Trajectory":
        return cls(tensors["seeds"].tolist(), tensors["grads"].tolist(), tensors["lrs"].tolist(), dict(meta or {}))

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, self.tensors(), dict(self.meta, format=FORMAT))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        tensors, meta = load_tensors(path, "trajectory")
        if meta.get("format") != FORMAT:
            raise SparseZOError(f"{path} has format {meta.get('format')!r}, expected a sparsezo trajectory ({FORMAT})")
        missing = {"seeds", "grads", "lrs"} - set(tensors)
        if missing:
            raise SparseZOError(f"trajectory {path} lacks {sorted(missing)}; the file is corrupt")
        meta.pop("format")
        return cls.from_tensors(tensors, meta)

    def replay(self, params: TrainableParams, cfg: ZOConfig, steps: int | None = None) -> None:
        """Apply the first ``steps`` (default: all) updates to ``params``, which must start at the base θ.

        Runs the exact update code of training (:meth:`ZOEngine.apply`), so optimiser state
        (momentum, Adam moments) is rebuilt along the way and the result is bit-identical.
        """
        steps = len(self) if steps is None else steps
        if steps > len(self):
            raise SparseZOError(f"cannot replay {steps} steps: the trajectory holds {len(self)}")
        engine = ZOEngine(params, cfg, max(steps, 1), cache_bytes=0)
        for t in range(steps):
            engine.apply(t, self.seeds[t], self.grads[t], self.lrs[t])
