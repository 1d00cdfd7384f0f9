"""What a run leaves behind: the fine-tune file (:class:`Delta`) and crash-safe training checkpoints.

``delta.safetensors`` holds the trained values and their indices only: ``<tensor>.indices``
(sorted flat int indices; absent for fully-trained tensors) and ``<tensor>.values`` (fp32) per
trainable tensor, with the mask's provenance and the base model's fingerprint in the header.
A 0.1% delta of a 7B model is ~54 MB; of SmolLM2 ~0.85 MB.

A checkpoint (``checkpoint-NNNNNNNN/`` in the run directory) is everything a resumed run needs
that its config does not say: θ, the optimiser state, the best-dev θ, the trajectory so far and
the metrics history. Batches and noise are functions of (seed, step), so there is no RNG state
to save. It is written to a temporary directory and renamed; the previous one is removed only
afterwards, and ``state.json`` carries the SHA-256 of the tensor file, so a checkpoint cut off
mid-write is recognised and the previous complete one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparseZOError
from .io import load_tensors, save_tensors
from .masks import Mask
from .masks.base import index_dtype
from .zo import TrainableParams, Trajectory

FORMAT = "sparsezo.delta/1"
CHECKPOINT_FORMAT = "sparsezo.checkpoint/1"
_CKPT = re.compile(r"^checkpoint-(\d{8})$")
log = logging.getLogger("sparsezo")


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
            if idx is not None:  # int32 when it fits, as in mask files: 8 bytes an entry with the value
                tensors[f"{name}.indices"] = idx.to(index_dtype(self.mask.shapes[name]))
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


@dataclass
class TrainState:
    """A run after ``step`` completed steps: enough to continue it bit-identically."""

    step: int
    theta: torch.Tensor
    opt_state: dict[str, torch.Tensor]
    best_value: float
    best_step: int
    best_theta: torch.Tensor
    trajectory: Trajectory
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories of a run, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and _CKPT.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save_checkpoint(run_dir: str | os.PathLike, state: TrainState, keep: int = 1) -> Path:
    """Write ``state`` as ``run_dir/checkpoint-<step>``; then drop all but the newest ``keep``."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=run_dir))
    try:
        tensors = {"theta": state.theta, "best_theta": state.best_theta,
                   **{f"opt.{k}": v for k, v in state.opt_state.items()},
                   **{f"trajectory.{k}": v for k, v in state.trajectory.tensors().items()}}
        save_tensors(tmp / "state.safetensors", tensors, {"format": CHECKPOINT_FORMAT})
        info = {"format": CHECKPOINT_FORMAT, "step": state.step, "best_value": state.best_value,
                "best_step": state.best_step, "seconds": state.seconds, "history": state.history,
                "trajectory_meta": state.trajectory.meta, "sha256": _sha256(tmp / "state.safetensors")}
        (tmp / "state.json").write_text(json.dumps(info))
        for f in tmp.iterdir():  # the data must be on disk before the rename makes it "the" checkpoint
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_checkpoint(path: Path) -> TrainState:
    info = json.loads((path / "state.json").read_text())
    if info.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"format {info.get('format')!r}")
    if _sha256(path / "state.safetensors") != info["sha256"]:
        raise ValueError("state.safetensors does not match the hash in state.json (cut off mid-write?)")
    tensors, _ = load_tensors(path / "state.safetensors", "checkpoint")
    traj = Trajectory.from_tensors({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("trajectory.")},
                                   info.get("trajectory_meta"))
    if len(traj) != info["step"]:
        raise ValueError(f"trajectory holds {len(traj)} steps, the checkpoint says {info['step']}")
    return TrainState(info["step"], tensors["theta"], {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
                      info["best_value"], info["best_step"], tensors["best_theta"], traj, info["history"],
                      info["seconds"])


def load_checkpoint(run_dir: str | os.PathLike) -> TrainState | None:
    """The newest intact checkpoint of ``run_dir`` (damaged ones are skipped with a warning), or None."""
    for path in checkpoint_dirs(run_dir):
        try:
            return _read_checkpoint(path)
        except (OSError, ValueError, KeyError, SparseZOError) as e:
            log.warning("skipping damaged checkpoint %s: %s", path, e)
    return None


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Drop checkpoints and leftovers of interrupted checkpoint writes (once the run's files are final)."""
    run_dir = Path(run_dir)
    for p in run_dir.iterdir():
        if p.is_dir() and (_CKPT.match(p.name) or (p.name.startswith(".checkpoint-") and p.name.endswith(".tmp"))):
            shutil.rmtree(p, ignore_errors=True)
