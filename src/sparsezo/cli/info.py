"""``sparsezo info``: the sizes of a run's files (trajectory, delta, mask) against the full model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import SparseZOError
from ..io import json_field, read_json
from ..model.memory import checkpoint_bytes
from ..model.params import DTYPES
from .common import check_readable, emit
from .options import add_command, add_json_arg

log = logging.getLogger("sparsezo")


def register(sub) -> None:
    p = add_command(sub, "info", "sizes of a run's files: trajectory, delta, mask, full model")
    p.add_argument("run_dir", help="run directory written by train or demo --out")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    check_readable(run_dir, "read")
    if not (run_dir / "config.json").is_file():
        raise SparseZOError(f"{run_dir} is not a sparsezo run directory (no config.json)")
    where = f"run config {run_dir / 'config.json'}"
    config = read_json(run_dir / "config.json", "run config")
    for key in ("task", "mask_rule", "model", "dtype"):
        json_field(config, key, str, where, optional=True)
    train_cfg = json_field(config, "train", dict, where, optional=True) or {}
    json_field(train_cfg, "steps", int, f"{where}: train", optional=True)
    json_field(config, "results", dict, where, optional=True)
    files = {name: run_dir / f"{name}.safetensors" for name in ("trajectory", "delta", "mask")}
    sizes = {f"{k}_bytes": p.stat().st_size for k, p in files.items() if p.is_file()}
    dtype = config.get("dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise SparseZOError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}; restore the file")
    try:
        sizes["full_model_bytes"] = checkpoint_bytes(config.get("model"), dtype)
    except (SparseZOError, OSError) as e:
        log.warning("full model size unknown: %s", e)
    except Exception as e:  # safetensors' own error type: a damaged model file is not info's failure
        log.warning("full model size unknown: the model's weights are unreadable (%s)", e)
    obj = {"run_dir": str(run_dir), "task": config.get("task"), "mask_rule": config.get("mask_rule"), "dtype": dtype,
           "steps": train_cfg.get("steps"), "results": config.get("results"), **sizes,
           "complete": (run_dir / "delta.safetensors").is_file()}
    best = (obj["results"] or {}).get("best_step")  # replay rebuilds up to it: say so beside the step count
    why = ("last step: --keep-last" if train_cfg.get("keep_best") is False
           else f"best dev{': the base, nothing learned' if best == 0 else ''}")
    kept = f", the delta is θ at step {best} ({why})" if obj["complete"] and isinstance(best, int) else ""
    lines = [f"{run_dir}: {obj['task']}, {obj['mask_rule']} mask, {obj['steps']} steps{kept}"
             f"{'' if obj['complete'] else ' (incomplete: resume with sparsezo train --resume ' + str(run_dir) + ')'}"]
    lines += [f"  {k[:-6]:>11}: {human(v):>10}  ({v} bytes)" for k, v in sizes.items()]
    emit(args, obj, "\n".join(lines))


def human(n: float) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
