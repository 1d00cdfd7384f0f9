"""A run directory: config.json, the final files (trajectory, delta), what --resume reads back, and its lock."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import SparseZOError
from ..io import read_json, write_json
from ..zo import TrainableParams, Trajectory, ZOConfig
from ..zo.registry import state_vectors
from .checkpoint import Delta
from .config import TrainConfig, TrainResult



def run_meta(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of a run: every setting needed to reproduce it."""
    return {"train": {k: v for k, v in asdict(cfg).items() if k != "zo"}, "zo": asdict(cfg.zo), **extra}


def save_delta(params: TrainableParams, path: str | Path, meta: dict[str, Any]) -> Delta:
    delta = Delta.from_params(params, meta)
    delta.save(path)
    return delta


def trajectory_meta(params: TrainableParams, cfg: ZOConfig, best_step: int, delta_meta: dict[str, Any]) -> dict[str, Any]:
    """What replay needs beside the steps: the update rule, which θ it applies to, where to stop,
    and the delta's header (so the replayed file is byte-identical to the trained one)."""
    return {"zo": asdict(cfg), "dtype": str(params.dtype).removeprefix("torch."), "mask_digest": params.mask.digest(),
            "fingerprint": params.mask.meta.get("fingerprint"), "best_step": best_step, "delta_meta": delta_meta}


def save_run(out: str | Path, params: TrainableParams, trajectory: Trajectory, zo: ZOConfig,
             delta_meta: dict[str, Any], config: dict[str, Any]) -> None:
    """The final files of a run, each atomic; ``delta.safetensors`` last, as it marks the run complete.

    ``params`` must hold the selected (best-dev) θ; ``delta_meta`` must not hold timings, so a
    resumed or replayed run writes the same bytes.
    """
    out = Path(out)
    trajectory.meta = trajectory_meta(params, zo, delta_meta["results"]["best_step"], delta_meta)
    trajectory.save(out / "trajectory.safetensors")
    write_json(out / "config.json", config)
    save_delta(params, out / "delta.safetensors", delta_meta)


def record_outcome(meta: dict[str, Any], result: TrainResult) -> None:
    """What a run chose while training, written into its ``meta`` (in place): the lr it trained with
    (``zo.lr``, the probe's choice with --lr auto) and the probe's report (``lr_auto``)."""
    meta["zo"] = asdict(result.zo)
    if result.lr_probe is not None:
        meta["lr_auto"] = result.lr_probe


def learned(result: TrainResult, metric: str) -> dict[str, Any]:
    """The fields that say whether a fine-tune learned anything (see :mod:`sparsezo.training.outcome`)."""
    out = {"improved": result.improved, f"start_dev_{metric}": result.start_dev, "dev_noise": result.dev_noise}
    if result.best_loss is not None:
        out["best_dev_loss"] = result.best_loss
    if result.at_ceiling:
        out["dev_at_ceiling"] = True
    if result.lr_probe:
        out["lr_auto_forwards"] = result.lr_probe["forwards"]
    return out


def run_bytes(entries: int, optimizer: str, q: int, steps: int, checkpoints: int) -> int:
    """An upper bound of the bytes a training run writes (mask, delta, checkpoints, trajectory, metrics).

    ``entries`` bounds the trainable entries; each costs 4 bytes in the mask, 8 in the delta, and
    4 per θ-sized vector (θ, best θ, the optimiser's state) in each of the ``checkpoints`` kept
    at once (0: none written).
    """
    vectors = 2 + state_vectors(optimizer)
    per_step = 24 * q * (checkpoints + 1) + 160 + 60 * q  # trajectory rows + a metrics.jsonl line
    return entries * (4 + 8 + 4 * vectors * checkpoints) + per_step * steps + (256 << 10)


def entries_bound(numel: int | None, density: float, full: bool) -> int:
    """Trainable entries of a rule's mask at ``density`` of ``numel`` weights (all of them for ``full``)."""
    return math.ceil((numel or 0) * (1.0 if full else density))


def resume_settings(run: Path, defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings recorded in ``run/config.json`` (``args``), checked against ``defaults`` (the train
    command's): a run can be resumed only when it is incomplete, has its mask, and records settings
    this version knows, each of its type. Runs recorded before --fused-pm took on/off/auto read as such."""
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise SparseZOError(f"--resume {run}: no config.json there; is it a sparsezo run directory?")
    recorded = read_json(cfg_path, "run config")
    if not isinstance(recorded, dict) or "args" not in recorded:
        raise SparseZOError(f"--resume {run}: not a sparsezo run directory (its config.json records no run "
                            "settings: a model folder?); pass the --out folder of an interrupted train run")
    if (run / "delta.safetensors").exists():
        raise SparseZOError(f"--resume {run}: the run is already complete (delta.safetensors exists); use it "
                            f"(sparsezo eval --delta {run}, merge, export) or start a new run with another --out")
    if not (run / "mask.safetensors").is_file():
        raise SparseZOError(f"--resume {run}: its mask.safetensors is missing; the run can only continue on the "
                            "mask it was trained with: restore the file, or start a new run")
    saved = recorded.get("args")
    if not saved:
        raise SparseZOError(f"--resume {run}: config.json has no recorded arguments; the run cannot be resumed")
    if not isinstance(saved, dict):
        raise SparseZOError(f"--resume {run}: config.json field 'args' is a {type(saved).__name__}, not an object; "
                            "restore the file")
    if isinstance(saved.get("fused_pm"), bool):  # written before --fused-pm took on/off/auto
        saved["fused_pm"] = "on" if saved["fused_pm"] else "off"
    for key, value in saved.items():  # each recorded setting must be one this version knows, of its type
        if key not in defaults:
            raise SparseZOError(f"--resume {run}: config.json records an unknown setting {key!r}; it was written by "
                                "another sparsezo version or edited")
        want = type(defaults[key])
        ok = (defaults[key] is None or value is None or isinstance(value, want)
              or (want is float and isinstance(value, int))) and not (isinstance(value, bool) and want is not bool)
        if not ok:
            raise SparseZOError(f"--resume {run}: config.json records {key} = {value!r:.40}, expected "
                                f"{want.__name__}; restore the file")
    return saved


