"""``sparsezo replay``: rebuild a run's delta from its seed trajectory (no data, no forwards)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import SparseZOError
from ..io import check_writable
from ..masks import Mask
from ..training.checkpoint import Delta
from ..training.replay import replayed_delta, run_files
from ..zo import Trajectory
from .common import check_readable, delta_base, emit, refuse_existing
from .options import add_command, add_run_base_args


def register(sub) -> None:
    p = add_command(sub, "replay", "rebuild a run's delta from its seed trajectory (no data, no forwards)")
    p.add_argument("run_dir", nargs="?", default=None, help="run directory with mask.safetensors and trajectory.safetensors")
    p.add_argument("--out", required=True, help="output delta.safetensors (or a folder for it)")
    p.add_argument("--mask", default=None, help="mask file (default: RUN_DIR/mask.safetensors)")
    p.add_argument("--trajectory", default=None, help="trajectory file (default: RUN_DIR/trajectory.safetensors)")
    add_run_base_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    refuse_existing(args.out)
    check_readable(args.run_dir, "replay")
    mask_path, traj_path = run_files(args.run_dir, args.mask, args.trajectory)
    mask, traj = Mask.load(mask_path), Trajectory.load(traj_path)
    if "zo" not in traj.meta:
        raise SparseZOError(f"trajectory {traj_path} records no ZO settings ('zo' in its header): it is not a "
                            "finished run's trajectory; replay the run's trajectory.safetensors")
    out = Path(args.out)
    out = out / "delta.safetensors" if out.suffix != ".safetensors" else out
    check_writable(out, 8 * mask.num_trainable + (64 << 10))
    info = Delta(mask, {}, traj.meta.get("delta_meta", {}))
    if args.dtype is None:
        args.dtype = traj.meta.get("dtype")
    model, _ = delta_base(args, info)
    t0 = time.perf_counter()
    delta = replayed_delta(model, mask, traj)
    seconds = time.perf_counter() - t0
    delta.save(out)
    steps = traj.meta.get("best_step", len(traj))
    emit(args, {"out": str(out), "steps": steps, "seconds": round(seconds, 3), "trajectory_bytes": traj_path.stat().st_size},
         f"replayed {steps} steps of {traj_path} in {seconds:.2f}s -> {out}")
