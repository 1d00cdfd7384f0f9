"""Rebuild a fine-tune from its seed trajectory: base model + mask + (seed, g, lr) per step → delta.

No data and no forward pass is needed: each step's z is regenerated from its seed and the
recorded scalar says how far to move along it. The base model is still needed, because the
trajectory moves θ away from the base's own values (and, with ``direction="applied"``, the
update depends on how θ±εz round in the compute dtype).
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from .checkpoint import Delta
from ..errors import SparseZOError
from ..masks import Mask
from ..zo import TrainableParams, Trajectory, ZOConfig


def replay_params(model, mask: Mask, trajectory: Trajectory, progress: bool = True) -> TrainableParams:
    """θ of ``mask`` on ``model`` after the trajectory's steps up to its selected (best) step.

    ``progress`` shows a step bar on stderr (with ETA).
    """
    meta = trajectory.meta
    if meta.get("mask_digest") and mask.digest() != meta["mask_digest"]:
        raise SparseZOError(f"the mask ({mask.rule}, digest {mask.digest()}) is not the one this trajectory was "
                            f"trained with (digest {meta['mask_digest']}); pass the run's mask.safetensors")
    params = TrainableParams(model, mask)  # checks the model against the mask's fingerprint
    if meta.get("dtype") and str(params.dtype).removeprefix("torch.") != meta["dtype"]:
        raise SparseZOError(f"the trajectory was trained in {meta['dtype']}, the model is loaded in {params.dtype}; "
                            f"replay with --dtype {meta['dtype']}")
    steps = meta.get("best_step", len(trajectory))
    with tqdm(total=steps, desc="replay", unit="step", leave=False, dynamic_ncols=True, disable=not progress) as bar:
        trajectory.replay(params, ZOConfig(**meta["zo"]), steps, progress=bar)
    return params


def run_files(run_dir: str | os.PathLike | None, mask: str | None, trajectory: str | None) -> tuple[Path, Path]:
    """The mask and trajectory files to replay: given explicitly, or those of ``run_dir``."""
    run = Path(run_dir) if run_dir else None
    if run is not None and not run.is_dir():
        raise SparseZOError(f"run directory {run} does not exist; pass the directory `sparsezo train` wrote")
    paths = []
    for given, name in ((mask, "mask.safetensors"), (trajectory, "trajectory.safetensors")):
        path = Path(given) if given else (run / name if run else None)
        if path is None or not path.is_file():
            raise SparseZOError(f"no {name} at {path}; give a run directory that has it or pass --{name.split('.')[0]}")
        paths.append(path)
    return paths[0], paths[1]


def replayed_delta(model, mask: Mask, trajectory: Trajectory, progress: bool = True) -> Delta:
    """The delta the trajectory's run saved, rebuilt (same values, same header, same bytes).

    ``model`` is handed back as it came (the base), so the delta can then be applied to it.
    """
    base = TrainableParams(model, mask).theta.clone()
    params = replay_params(model, mask, trajectory, progress)
    delta = Delta.from_params(params, trajectory.meta.get("delta_meta", {}))
    params.theta.copy_(base)
    params.restore()
    return delta
