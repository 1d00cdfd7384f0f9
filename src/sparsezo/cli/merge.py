"""``sparsezo merge``: write base + delta as a plain Hugging Face model folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..export.hf import save_merged
from ..io import check_writable
from ..model.memory import checkpoint_bytes
from ..resources import memory_report
from ..training.checkpoint import load_delta
from .common import check_readable, delta_base, delta_is_base, emit, memory_text, refuse_existing
from .options import add_command, add_run_base_args


def register(sub) -> None:
    p = add_command(sub, "merge", "write base + delta as a plain Hugging Face model folder")
    p.add_argument("--delta", required=True, help="run directory or delta.safetensors")
    p.add_argument("--out", required=True, help="output model folder")
    add_run_base_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    refuse_existing(args.out)
    check_readable(args.delta, "merge")
    delta = load_delta(args.delta)
    base = args.model or delta.meta.get("model")
    check_writable(args.out, checkpoint_bytes(base, args.dtype or delta.meta.get("dtype", "bfloat16")) if base and
                   Path(base).is_dir() else 0)  # the merged weights, before the base is loaded
    model, tok = delta_base(args, delta)
    t0 = time.perf_counter()
    unchanged = delta_is_base(model, delta)
    nbytes = save_merged(model, tok, args.out, delta=delta)  # streamed: the base is never modified
    mem = memory_report(args.device)
    emit(args, {"out": args.out, "num_trained": delta.mask.num_trainable, "quant_base": delta.meta.get("quant"),
                "delta_is_base": unchanged,
                "weight_bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2), **mem},
         merged_text(args.out, model.name_or_path, delta.mask.num_trainable, bool(delta.meta.get("quant")), unchanged)
         + f"; {memory_text(mem)}")


def merged_text(out: str, base: str, trained: int, quant: bool, unchanged: bool) -> str:
    """The written folder first, then what it holds: "merged N weights into BASE -> OUT" read as if BASE
    itself had been written to."""
    deq = ", 4-bit base dequantized" if quant else ""
    if unchanged:
        return f"wrote {out}: a copy of {base}{deq} (the delta equals the base: nothing was learned)"
    return f"wrote {out}: {base} + {trained} trained weights{deq} (the base itself is unchanged)"
