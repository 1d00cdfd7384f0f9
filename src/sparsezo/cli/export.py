"""``sparsezo export``: base + delta in another tool's format (:data:`sparsezo.export.registry.EXPORTERS`)."""

from __future__ import annotations

import argparse
import time

from ..errors import SparseZOError
from ..export.gguf import TYPES as GGUF_TYPES
from ..export.registry import EXPORTERS
from ..io import check_writable
from ..training.checkpoint import load_delta
from .common import check_readable, delta_base, delta_is_base, emit, refuse_existing
from .options import add_command, add_run_base_args


def register(sub) -> None:
    p = add_command(sub, "export", "write base + delta for another tool: a GGUF file for llama.cpp (--format gguf) "
                                   "or a PEFT adapter (--format peft); plain Hugging Face folders: sparsezo merge")
    p.add_argument("--format", required=True, choices=list(EXPORTERS),
                   help="; ".join(f"{k}: {e.HELP}" for k, e in EXPORTERS.items()))
    p.add_argument("--delta", required=True, help="run directory or delta.safetensors")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (peft)")
    p.add_argument("--type", default=None, choices=list(GGUF_TYPES),
                   help="GGUF storage type of the 2-D weights (norms stay f32); q8_0 halves the file and kept a "
                        "0.1%% SST-2 fine-tune's accuracy in llama.cpp; plain 4-bit loses it, q4_0+q8_0 and "
                        "q4_1+q8_0 keep it: 4-bit, with the tensors holding 90%% of the trained entries and the "
                        "output layer at 8 bits (README) (default: f16)")
    add_run_base_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """base + delta in the --format's layout; the base is never modified."""
    refuse_existing(args.out)
    if args.type is not None and args.format != "gguf":
        raise SparseZOError(f"--type {args.type} applies to --format gguf only; drop it for --format {args.format}")
    check_writable(args.out)
    check_readable(args.delta, "export")
    delta = load_delta(args.delta)
    model, tok = delta_base(args, delta)
    t0 = time.perf_counter()
    exporter = EXPORTERS[args.format]
    unchanged = delta_is_base(model, delta)
    info = exporter.write(model, tok, delta, args.out, {"type": args.type})
    info.update(num_trained=delta.mask.num_trainable, quant_base=delta.meta.get("quant"), delta_is_base=unchanged,
                seconds=round(time.perf_counter() - t0, 2))
    emit(args, info, exporter.describe(info))
