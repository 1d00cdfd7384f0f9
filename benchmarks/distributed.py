"""Traffic and communication share of multi-process ZO steps: 1 process vs 2 (data- and query-parallel).

    python benchmarks/distributed.py [--model DIR] [--dtype bfloat16] [--batch 16] [--q 2] [--steps 5] [--threads 1]

Prints one JSON object. Each configuration runs in fresh processes (2-process ones through
torch.distributed.run, gloo) on the same machine, ``--threads`` threads each. Per step: wall
time, time inside collectives (which includes waiting for the slower rank), payload bytes each
rank sent plus received; and, separately, the bare latency of that exchange (after a barrier,
so no waiting is included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOTE = ("measured on a 2-core CPU machine shared with other jobs: 1 thread per process, the 2 processes compete "
        "for the same 2 cores (and memory bandwidth), so the step times say nothing about throughput scaling on "
        "GPUs or several nodes; the traffic figures (bytes per step, exchanges, exchange latency) carry over")


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration; rank 0 (or the lone process) writes the measurements to ``--result``."""
    import torch

    from sparsezo.training.distributed import DistributedEngine, init_from_env
    from sparsezo.masks import compute_mask
    from sparsezo.model.load import load_model
    from sparsezo.eval.scoring import batch_loss, encode, make_batch
    from sparsezo.tasks import get_task
    from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine

    ctx = init_from_env(args.parallel, 600, "cpu") if args.parallel else None
    model, tok = load_model(args.model, args.dtype)
    examples = get_task("sst2").splits(0, args.batch, 1, 1)["train"]
    params = TrainableParams(model, compute_mask(model, "random", args.density, seed=0))
    cfg = ZOConfig(lr=1e-7, eps=1e-2, q=args.q)
    engine = DistributedEngine(params, cfg, 10**6, ctx) if ctx else ZOEngine(params, cfg, 10**6)
    idx = ctx.shard(list(range(args.batch))) if ctx else list(range(args.batch))
    batch = make_batch(encode(tok, [examples[i] for i in idx]), tok.pad_token_id)
    loss = lambda: batch_loss(model, batch)  # noqa: E731
    steps, comm, sent = [], [], []
    for t in range(args.steps + 1):  # step 0 warms up
        c0, b0 = (ctx.comm_seconds, ctx.comm_bytes) if ctx else (0.0, 0)
        t0 = time.perf_counter()
        engine.step(t, loss, len(idx)) if ctx else engine.step(t, loss)
        if t:
            steps.append(time.perf_counter() - t0)
            comm.append(ctx.comm_seconds - c0 if ctx else 0.0)
            sent.append(ctx.comm_bytes - b0 if ctx else 0)
    world = ctx.world if ctx else 1
    row = {"processes": world, "parallel": args.parallel, "threads_per_process": torch.get_num_threads(),
           "examples_per_process": len(idx), "queries_per_process": args.q // world if args.parallel == "query" else args.q,
           "trainable": params.numel, "step_ms": 1000 * statistics.median(steps), "comm_ms": 1000 * statistics.median(comm),
           "comm_share": statistics.median(c / s for c, s in zip(comm, steps)), "bytes_per_step": max(sent)}  # the same every step
    if ctx:  # the same exchange with everyone already waiting: what the network itself costs
        payload = (torch.zeros(2, dtype=torch.float64) if args.parallel == "data"
                   else torch.zeros(args.q // ctx.world, 3, dtype=torch.int64))
        lat = []
        for _ in range(200):
            ctx.barrier("latency probe")
            t0 = time.perf_counter()
            ctx.all_gather(payload, "latency probe")
            lat.append(time.perf_counter() - t0)
        row["exchanges_per_step"] = 2 * args.q if args.parallel == "data" else 1
        row["exchange_us"] = 1e6 * statistics.median(lat)
        ctx.close()
    if not ctx or ctx.is_main:
        Path(args.result).write_text(json.dumps(row))


def run(args: argparse.Namespace, nproc: int, parallel: str | None) -> dict:
    result = Path(tempfile.mkdtemp()) / "row.json"
    own = [__file__, "--worker", "--result", str(result), "--dtype", args.dtype, "--batch", str(args.batch),
           "--q", str(args.q), "--steps", str(args.steps), "--density", str(args.density),
           *(["--model", args.model] if args.model else []), *(["--parallel", parallel] if parallel else [])]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if parallel else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run([sys.executable, *launcher, *own], check=True, env=env)
    row = json.loads(result.read_text())
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16, help="global batch (SST-2 training prompts)")
    ap.add_argument("--q", type=int, default=2, help="queries per step (even, so 2 ranks can share them)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per configuration (medians reported)")
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per process (1: on a loaded 2-core machine 2 OpenMP threads can stall each other)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [run(args, 1, None), run(args, 2, "data"), run(args, 2, "query")]
    print(json.dumps({"model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype, "batch": args.batch,
                      "q": args.q, "cores": len(os.sched_getaffinity(0)), "runs": rows,
                      "first_order_gradient_bytes": 4 * rows[0]["trainable"], "note": NOTE}))


if __name__ == "__main__":
    main()
