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
mid-write is recognised and the previous complete one is used. It also records the mask digest
and the model fingerprint: resuming over a swapped ``mask.safetensors`` or another base model
would silently train other weights, so :func:`check_resumable` refuses it.

Both files are validated on load (dtypes, lengths, finiteness, sortedness, JSON field types):
they are read from disk, so they are treated as untrusted input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparseZOError
from ..io import check_indices, check_values, json_field, load_tensors, read_json, save_tensors, temp_dir
from ..masks import Mask
from ..masks.base import index_dtype, numel, shapes_from_meta
from ..zo import TrainableParams, Trajectory

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
        """Write the delta atomically; a non-finite value is refused (it would poison every merge)."""
        tensors = {}
        for name, v in self.values.items():
            check_values(v.detach().float().cpu(), f"delta {path}: values of {name}", (torch.float32,))
            idx = self.mask.indices[name]
            if idx is not None:  # int32 when it fits, as in mask files: 8 bytes an entry with the value
                tensors[f"{name}.indices"] = idx.to(index_dtype(self.mask.shapes[name]))
            tensors[f"{name}.values"] = v.float()
        meta = dict(self.meta, format=FORMAT, mask={k: v for k, v in self.mask.meta.items()},
                    shapes={n: list(s) for n, s in self.mask.shapes.items()})
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Delta":
        """Read and validate a delta file: every index list sorted, unique and in range, every value finite."""
        tensors, meta = load_tensors(path, "delta")
        where = f"delta {path}"
        if meta.get("format") != FORMAT:
            raise SparseZOError(f"{path} has format {meta.get('format')!r}, expected a sparsezo delta ({FORMAT})")
        shapes = shapes_from_meta(meta, where)
        json_field(meta, "mask", dict, where, optional=True)
        expected = {f"{n}.{kind}" for n in shapes for kind in ("indices", "values")}
        extra = sorted(set(tensors) - expected)
        if extra:
            raise SparseZOError(f"{where} holds tensor(s) {extra[:3]} not listed in its shapes; the file is corrupt")
        indices, values = {}, {}
        for name, shape in shapes.items():
            if f"{name}.values" not in tensors:
                raise SparseZOError(f"{where} lacks values for {name}; the file is corrupt")
            idx = tensors.get(f"{name}.indices")
            indices[name] = None if idx is None else check_indices(idx, numel(shape), f"{where}: {name}.indices")
            n = numel(shape) if idx is None else indices[name].numel()
            values[name] = check_values(tensors[f"{name}.values"], f"{where}: {name}.values", (torch.float32,), numel=n)
        mask = Mask(indices, shapes, meta.get("mask") or {})
        if mask.num_trainable == 0:
            raise SparseZOError(f"{where} holds no trained entries; it is empty, re-create it")
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
    mask_digest: str | None = None  # Mask.digest() of the mask θ indexes: a resume must use the same one
    fingerprint: dict[str, Any] | None = None  # model_fingerprint() of the base θ started from


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
    tmp = temp_dir(run_dir, final.name)
    try:
        tensors = {"theta": state.theta, "best_theta": state.best_theta,
                   **{f"opt.{k}": v for k, v in state.opt_state.items()},
                   **{f"trajectory.{k}": v for k, v in state.trajectory.tensors().items()}}
        save_tensors(tmp / "state.safetensors", tensors, {"format": CHECKPOINT_FORMAT})
        info = {"format": CHECKPOINT_FORMAT, "step": state.step, "best_value": state.best_value,
                "best_step": state.best_step, "seconds": state.seconds, "history": state.history,
                "trajectory_meta": state.trajectory.meta, "sha256": _sha256(tmp / "state.safetensors"),
                "mask_digest": state.mask_digest, "fingerprint": state.fingerprint}
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
    """One checkpoint, validated field by field (a damaged one raises :class:`SparseZOError`)."""
    where = f"checkpoint {path}/state.json"
    info = read_json(path / "state.json", "checkpoint file")
    if info.get("format") != CHECKPOINT_FORMAT:
        raise SparseZOError(f"{where} has format {info.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    step = json_field(info, "step", int, where)
    if _sha256(path / "state.safetensors") != json_field(info, "sha256", str, where):
        raise SparseZOError("state.safetensors does not match the hash in state.json (cut off mid-write?)")
    best_step = json_field(info, "best_step", int, where)
    if not 0 <= best_step <= step:
        raise SparseZOError(f"{where}: best_step {best_step} is outside 0..{step}")
    history = json_field(info, "history", list, where)
    if not all(isinstance(r, dict) for r in history):
        raise SparseZOError(f"{where}: history must be a list of objects")
    tensors, _ = load_tensors(path / "state.safetensors", "checkpoint")
    at = f"checkpoint {path}/state.safetensors"
    for key in ("theta", "best_theta"):
        if key not in tensors:
            raise SparseZOError(f"{at} lacks {key!r}")
    n = tensors["theta"].numel()
    theta, best = (check_values(tensors[k], f"{at}: {k}", (torch.float32,), numel=n) for k in ("theta", "best_theta"))
    opt = {k[4:]: check_values(v, f"{at}: {k}", (torch.float32,), numel=n) for k, v in tensors.items()
           if k.startswith("opt.")}
    traj = Trajectory.checked({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("trajectory.")},
                              json_field(info, "trajectory_meta", dict, where, optional=True) or {}, at)
    if len(traj) != step:
        raise SparseZOError(f"{at}: the trajectory holds {len(traj)} steps, state.json says {step}")
    return TrainState(step, theta, opt, float(json_field(info, "best_value", (int, float), where)), best_step, best,
                      traj, history, float(json_field(info, "seconds", (int, float), where)),
                      json_field(info, "mask_digest", str, where, optional=True),
                      json_field(info, "fingerprint", dict, where, optional=True))


def load_checkpoint(run_dir: str | os.PathLike) -> TrainState | None:
    """The newest intact checkpoint of ``run_dir`` (damaged ones are skipped with a warning), or None if there is none.

    When checkpoints exist but none is intact, that is an error rather than a silent restart
    from step 0: checkpoints are renamed into place only once complete, so a damaged one means
    the files were altered after the fact, and the user should decide.
    """
    found = checkpoint_dirs(run_dir)
    reasons = []
    for path in found:
        try:
            return _read_checkpoint(path)
        except (OSError, SparseZOError) as e:
            log.warning("skipping damaged checkpoint %s: %s", path, e)
            reasons.append(f"{path.name}: {e}")
    if found:
        raise SparseZOError(f"none of the {len(found)} checkpoint(s) of {run_dir} is intact ({reasons[0]}); "
                            f"remove the checkpoint-* folders to start the run over")
    return None


def check_resumable(state: TrainState, params: TrainableParams, opt_state: dict[str, torch.Tensor],
                    fingerprint: dict[str, Any]) -> None:
    """Refuse to continue ``state`` on another mask, another base model or another optimiser.

    θ holds the values of the mask's entries in order: with a swapped mask of the same size the
    numbers would land on other weights and the run would go on silently wrong.
    """
    digest = params.mask.digest()
    if state.mask_digest is not None and state.mask_digest != digest:
        raise SparseZOError(f"the checkpoint (step {state.step}) was trained with mask digest {state.mask_digest}, "
                            f"the run's mask.safetensors now has digest {digest}: the mask file was replaced; "
                            "restore the original mask or start a new run")
    if state.fingerprint is not None:
        for key in ("shapes", "values"):
            if state.fingerprint.get(key) != fingerprint.get(key):
                raise SparseZOError(f"the checkpoint (step {state.step}) was trained on another base model "
                                    f"({key} fingerprint {state.fingerprint.get(key)}, this model has "
                                    f"{fingerprint.get(key)}); resume with the run's original model")
    for name, t in (("theta", state.theta), ("best_theta", state.best_theta)):
        if t.numel() != params.numel:
            raise SparseZOError(f"the checkpoint's {name} has {t.numel()} entries, the mask selects {params.numel}; "
                                "the run's mask or checkpoint was replaced")
    if set(state.opt_state) != set(opt_state):
        raise SparseZOError(f"the checkpoint holds optimiser state {sorted(state.opt_state)}, the optimiser needs "
                            f"{sorted(opt_state)}; the run's config.json was edited, restore it")


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Drop checkpoints and leftovers of interrupted checkpoint writes (once the run's files are final)."""
    run_dir = Path(run_dir)
    for p in run_dir.iterdir():
        if p.is_dir() and (_CKPT.match(p.name) or (p.name.startswith(".checkpoint-") and p.name.endswith(".tmp"))):
            shutil.rmtree(p, ignore_errors=True)
