"""Sizes and costs of a finished run's shareable files: trajectory vs delta vs full model, replay,
hot-swap and merge times. Prints one JSON object.

    sparsezo demo --out runs/demo              # or any `sparsezo train` run directory
    python benchmarks/finetune_files.py runs/demo

Replay must give the run's delta byte for byte; the script fails loudly if it does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsezo.training.checkpoint import load_delta
from sparsezo.export.hf import save_merged
from sparsezo.masks import Mask
from sparsezo.model.load import load_model
from sparsezo.model.memory import checkpoint_bytes
from sparsezo.training.replay import replayed_delta
from sparsezo.zo import Trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=20, help="hot-swap repetitions (median reported)")
    args = ap.parse_args()
    run = args.run_dir
    config = json.loads((run / "config.json").read_text())
    traj = Trajectory.load(run / "trajectory.safetensors")
    mask = Mask.load(run / "mask.safetensors")
    delta = load_delta(run)
    model, tok = load_model(config["model"], config["dtype"], quant=config.get("quant"),
                            mask=mask if config.get("quant") else None)

    t = time.perf_counter()
    rebuilt = replayed_delta(model, mask, traj)
    replay_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt.save(Path(tmp) / "delta.safetensors")
        identical = (Path(tmp) / "delta.safetensors").read_bytes() == (run / "delta.safetensors").read_bytes()
    if not identical:
        sys.exit("replay did not reproduce delta.safetensors byte for byte")

    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_t, remove_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        handle = delta.apply(model)
        apply_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        handle.remove()
        remove_t.append(time.perf_counter() - t)
    restored = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    delta.apply(model)  # the merged export below is base + delta

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_merged(model, tok, Path(tmp) / "merged")  # (4-bit layers are written dequantized)
        merge_s = time.perf_counter() - t
        merged_bytes = sum(p.stat().st_size for p in (Path(tmp) / "merged").glob("*.safetensors"))

    out = {
        "run_dir": str(run), "steps": len(traj), "best_step": traj.meta.get("best_step"),
        "num_trainable": mask.num_trainable, "dtype": config["dtype"], "quant": config.get("quant"),
        "trajectory_bytes": (run / "trajectory.safetensors").stat().st_size,
        "delta_bytes": (run / "delta.safetensors").stat().st_size,
        "mask_bytes": (run / "mask.safetensors").stat().st_size,
        "full_model_bytes": checkpoint_bytes(config["model"], config["dtype"]),
        "merged_folder_weight_bytes": merged_bytes,
        "replay_seconds": round(replay_s, 3), "replay_bit_identical": identical,
        "hot_swap_apply_ms": round(statistics.median(apply_t) * 1000, 2),
        "hot_swap_remove_ms": round(statistics.median(remove_t) * 1000, 2),
        "remove_restores_base_bit_identically": restored, "merge_seconds": round(merge_s, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
