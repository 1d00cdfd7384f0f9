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
    steps = traj.meta.get("best_step", len(traj))  # the steps whose updates θ holds (the selected one)
    emit(args, {"out": str(out), "steps": steps, "recorded_steps": len(traj), "seconds": round(seconds, 3),
                "trajectory_bytes": traj_path.stat().st_size},
         replayed_text(steps, len(traj), f"of {traj_path} in {seconds:.2f}s -> {out}"))


def replayed_text(steps: int, recorded: int, where: str) -> str:
    """How much of the trajectory the delta holds. A run keeps the θ of its best dev evaluation, so "replayed
    0 steps" beside `info`'s 20 steps reads as a broken replay unless it says which step θ is and why."""
    if steps == recorded:
        return f"replayed all {recorded} recorded steps {where}"
    if steps == 0:
        return (f"replayed 0 of {recorded} recorded steps {where}; the run's best dev evaluation was at step 0, "
                "so the delta equals the base (nothing was learned)")
    return f"replayed {steps} of {recorded} recorded steps {where} (θ of step {steps}, the run's best dev evaluation)"
