"""4-bit base on CPU: weight bytes, forward time nf4 vs bf16, ZO step / 2 forwards, 7B memory account.

    python benchmarks/quant_overhead.py [--mask results/masks_masks/wikitext.safetensors] [--steps 10]

Prints one JSON object. The Llama-2-7B account is computed from the architecture's shapes with
the same layout NF4Linear stores (no 7B weights are needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from sparsezo.masks import Mask, compute_mask
from sparsezo.model.load import load_model
from sparsezo.quant.convert import load_quantized, weight_bytes
from sparsezo.resources import peak_memory_bytes
from sparsezo.eval.scoring import batch_loss, encode, make_batch
from sparsezo.tasks import get_task
from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def nf4_bytes(out_f: int, in_f: int, k: int, dtype_bytes: int = 2) -> int:
    """Bytes NF4Linear holds: codes, 8-bit absmax + its fp32 second level, code tables, exact entries."""
    n = out_f * in_f
    blocks = n // 64
    return n // 2 + blocks + -(-blocks // 256) * 4 + (16 + 256 + 1) * 4 + k * (8 + dtype_bytes) + 64 * dtype_bytes


def llama2_7b_account(density: float) -> dict:
    """Exact weight memory of Llama-2-7B with NF4 linears, 0.1% exact bf16 entries, bf16 embeddings."""
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    shapes = [(h, h)] * 4 + [(inter, h), (inter, h), (h, inter)]
    eligible = layers * sum(o * i for o, i in shapes)
    k_total = round(density * eligible)
    quant = layers * sum(nf4_bytes(o, i, round(k_total * o * i / eligible)) for o, i in shapes)
    dense = 2 * vocab * h * 2 + (2 * layers + 1) * h * 2  # embed + lm_head (untied) + norms, bf16
    theta = k_total * 4 * 3  # fp32 θ, z and a best-dev copy during training
    return {"eligible": eligible, "trainable": k_total, "nf4_linear_bytes": quant, "bf16_dense_bytes": dense,
            "theta_z_best_bytes": theta, "total_gib": (quant + dense + theta) / 2**30,
            "bf16_total_gib": (eligible * 2 + dense) / 2**30}


def load_peak_rss(kind: str, mask: str | None) -> int:
    """Peak RSS of a fresh process that only loads the default model (bf16, or nf4 while streaming)."""
    code = ("import json, sys, torch; from sparsezo.model.load import load_model; from sparsezo.masks import Mask; "
            "from sparsezo.resources import peak_memory_bytes; "
            f"m = Mask.load({mask!r}) if {kind == 'nf4'} else None; "
            f"load_model(None, 'bfloat16', quant={'nf4' if kind == 'nf4' else None!r}, mask=m); "
            "print(peak_memory_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", default=None, help="mask file (default: random 0.1%%)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if args.mask:  # peak memory of loading alone, each in its own process
        peaks = {kind: load_peak_rss(kind, args.mask) for kind in ("bf16", "nf4")}

    bf16, tok = load_model(None, "bfloat16")
    mask = Mask.load(args.mask) if args.mask else compute_mask(bf16, "random", 1e-3, seed=0)
    t = time.perf_counter()
    nf4 = load_quantized(bf16.name_or_path, mask, torch.bfloat16)
    load_s = time.perf_counter() - t
    examples = get_task("sst2").splits(0, args.batch, 1, 1)["train"]
    batch = make_batch(encode(tok, examples), tok.pad_token_id)
    f_bf16, f_nf4, steps, pairs = [], [], [], []
    params = TrainableParams(nf4, mask)
    engine = ZOEngine(params, ZOConfig(lr=1e-7, eps=1e-2), 10**6)
    batch_loss(bf16, batch), batch_loss(nf4, batch)
    for i in range(args.steps):  # interleaved: CPU speed drifts on a shared machine
        f_bf16.append(ms(lambda: batch_loss(bf16, batch)))
        f_nf4.append(ms(lambda: batch_loss(nf4, batch)))
        pairs.append(ms(lambda: (batch_loss(nf4, batch), batch_loss(nf4, batch))))
        steps.append(ms(lambda: engine.step(i, lambda: batch_loss(nf4, batch))))
    med = statistics.median
    out = {
        "model": str(bf16.name_or_path), "batch": args.batch, "mask": mask.rule, "trainable": mask.num_trainable,
        "weight_bytes_bf16": weight_bytes(bf16)["total"], "weight_bytes_nf4": weight_bytes(nf4),
        "streaming_load_seconds": round(load_s, 2),
        "forward_ms_bf16": med(f_bf16), "forward_ms_nf4": med(f_nf4), "nf4_over_bf16_forward": med(f_nf4) / med(f_bf16),
        "step_ms_nf4": med(steps), "nf4_step_over_two_forwards": med(steps) / med(pairs),
        "peak_rss_bytes": peak_memory_bytes(), "llama2_7b_account": llama2_7b_account(1e-3),
    }
    if args.mask:
        out["load_only_peak_rss_bytes"] = peaks
    print(json.dumps(out))
    print(json.dumps(out, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
