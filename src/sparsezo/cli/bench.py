"""``sparsezo bench``: time a ZO step against two forward passes; ``--compare`` the fused ±ε step per base."""

from __future__ import annotations

import argparse
import gc

from ..bench import bench, bench_fused
from ..errors import SparseZOError
from ..quant import QUANT_TYPES
from .common import check_common, emit, memory_text, model_and_mask
from .options import add_command, add_dist_arg, add_model_args, add_scope_arg

BASES = ("bf16", *QUANT_TYPES)  # --compare: the unquantized base and each 4-bit kind


def register(sub) -> None:
    p = add_command(sub, "bench", "time a ZO step against two forward passes (JSON with --json)")
    model, mask, work, output = (p.add_argument_group(t) for t in ("model", "mask", "measurement", "output"))
    add_model_args(model, output=output)
    mask.add_argument("--mask", default="random",
                      help="a mask file or a rule that needs no data (random, magnitude-*, full)")
    mask.add_argument("--seed", type=int, default=0, help="seeds the random mask, the batch and the noise")
    mask.add_argument("--density", type=float, default=1e-3, help="fraction of eligible weights in the mask")
    add_scope_arg(mask)
    p.set_defaults(task=None, calib=None, calib_tokens=32768, calib_seq_len=256, include=None, exclude=None)
    work.add_argument("--batch", type=int, default=16, help="rows of the synthetic batch")
    work.add_argument("--seq-len", type=int, default=256, help="tokens per row of the synthetic batch")
    work.add_argument("--steps", type=int, default=10, help="measured steps (medians are reported)")
    work.add_argument("--eps", type=float, default=1e-2, help="perturbation scale")
    add_dist_arg(work, "distribution of z")
    work.add_argument("--baseline", default=None, choices=["mezo"],
                      help="also time MeZO's per-tensor loop, side by side (default: none)")
    work.add_argument("--compare", default=None, metavar="BASES",
                      help=f"comma-separated bases among {','.join(sorted(BASES))}: for each in turn (one loaded at "
                           "a time), the forward, the unfused step and the fused ±ε step (--fused-pm), interleaved; "
                           "--quant is ignored (default: a single sparsezo step vs two forwards)")
    p.set_defaults(func=run)


def compare(args: argparse.Namespace) -> None:
    """``bench --compare``: unfused vs fused step for each base in turn, one model loaded at a time."""
    bases = [b.strip() for b in args.compare.split(",") if b.strip()]
    bad = [b for b in bases if b not in BASES]
    if not bases or bad:
        raise SparseZOError(f"--compare takes a comma-separated list of {', '.join(BASES)}; got {args.compare!r}")
    results: dict[str, dict] = {}
    for base in bases:
        model, _, mask = model_and_mask(args, quant=None if base == "bf16" else base)
        results[base] = bench_fused(model, mask, args.batch, args.seq_len, args.steps, args.eps, args.dist)
        del model, mask
        gc.collect()
    res = {"compare": results, "batch": args.batch, "seq_len": args.seq_len, "mask": args.mask, "dtype": args.dtype,
           "model": str(args.model or "default")}
    first = results[bases[0]]["forward_ms"]
    lines = [f"batch {args.batch} x {args.seq_len} tokens, {args.dtype}, mask {args.mask}; ratios from interleaved medians",
             f"{'base':5} {'forward ms':>10} {'vs ' + bases[0]:>8} {'step ms':>9} {'step/2fwd':>9} {'fused ms':>9} "
             f"{'fused/2fwd':>10} {'fused/step':>10}"]
    lines += [f"{b:5} {r['forward_ms']:10.1f} {r['forward_ms'] / first:8.2f} {r['step_ms']:9.1f} "
              f"{r['step_over_two_forwards']:9.3f} {r['fused_step_ms']:9.1f} {r['fused_over_two_forwards']:10.3f} "
              f"{r['fused_over_step']:10.3f}" for b, r in results.items()]
    emit(args, res, "\n".join(lines))


def run(args: argparse.Namespace) -> None:
    check_common(args)
    if args.compare:
        compare(args)
        return
    model, _, mask = model_and_mask(args, quant=args.quant)
    res = bench(model, mask, args.batch, args.seq_len, args.steps, args.eps, args.dist, args.baseline)
    res.update(model=str(model.name_or_path), mask=mask.rule, quant=args.quant)
    rows = [("sparsezo", res)] + ([("mezo", res["baseline"])] if "baseline" in res else [])
    lines = [f"{mask.rule} mask, {res['trainable']} trainable, batch {args.batch} x {args.seq_len} tokens, {res['device']}, "
             f"{res['dtype']}{', ' + args.quant if args.quant else ''}",
             f"{'':9} {'forward ms':>10} {'step ms':>9} {'step/2fwd':>9} {'perturb ms':>10} {'peak MiB':>9} {'tokens/s':>9}"]
    lines += [f"{n:9} {r['forward_ms']:10.1f} {r['step_ms']:9.1f} {r['step_over_two_forwards']:9.3f} "
              f"{r['perturb_ms']:10.2f} {r['peak_memory_bytes'] / 2**20:9.0f} {r['tokens_per_s']:9.0f}" for n, r in rows]
    lines.append(memory_text(res) + " — the anonymous figure is what must fit; mapped checkpoint pages are evictable")
    emit(args, res, "\n".join(lines))
