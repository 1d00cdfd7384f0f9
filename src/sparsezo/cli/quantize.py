"""``sparsezo quantize``: save a 4-bit base whose mask entries stay exact (reload with --model DIR)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..io import check_writable
from ..masks import RULES, Mask
from ..model.memory import checkpoint_bytes
from ..model.params import DTYPES, checkpoint_fingerprint
from ..model.resolve import resolve_model_path
from ..quant import QUANT_TYPES
from ..quant.convert import quantize_folder, save_quantized, weight_bytes
from ..quant.layers import is_quantized_folder
from ..resources import memory_report
from .common import check_common, emit, memory_text, model_and_mask, refuse_existing, train_split
from .options import add_command, add_mask_command_args


def register(sub) -> None:
    p = add_command(sub, "quantize", "save a 4-bit (NF4 or int4) base whose mask entries stay exact (reload with "
                                     "--model DIR)")
    model, output = add_mask_command_args(p, quant=False, selection=True)
    model.add_argument("--quant", default="nf4", choices=list(QUANT_TYPES),
                       help="4-bit format: nf4 (bitsandbytes) or int4 (PyTorch's int4 kernels, fast on CPU) "
                            "(default: nf4)")
    output.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """With a mask file, quantize straight from the checkpoint (the model is never loaded); with a
    rule, the mask needs the full-precision model, which is then quantized in place and saved."""
    check_common(args)
    refuse_existing(args.out)
    t0 = time.perf_counter()
    folder = resolve_model_path(args.model)
    check_writable(args.out, checkpoint_bytes(folder, args.dtype) // 3)  # 4-bit linears + 16-bit rest, roughly
    if args.mask not in RULES and Path(args.mask).is_file() and not is_quantized_folder(folder):
        mask = Mask.load(args.mask)
        if "fingerprint" in mask.meta:  # the mask must be this model's: checked on a header-only skeleton
            checkpoint_fingerprint(folder, args.dtype, check=mask.meta["fingerprint"], what="mask")
        wb = quantize_folder(folder, mask, args.out, DTYPES[args.dtype], quant=args.quant)
    else:
        model, tok, mask = model_and_mask(args, train_split(args), args.quant)
        save_quantized(model, tok, args.out, mask)
        wb = weight_bytes(model)
    mem = memory_report(args.device)
    emit(args, dict(wb, out=args.out, num_trainable=mask.num_trainable, quant=args.quant,
                    seconds=round(time.perf_counter() - t0, 2), **mem),
         f"{args.quant} model with {mask.num_trainable} exact trainable entries ({mask.rule}): "
         f"{wb['total'] / 2**20:.1f} MiB of weights ({wb['quantized'] / 2**20:.1f} MiB 4-bit layers) -> {args.out}; "
         f"{memory_text(mem)}")
