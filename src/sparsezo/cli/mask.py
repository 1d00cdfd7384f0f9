"""``sparsezo mask compute|info|compare|mass``: compute a mask file and inspect masks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import SparseZOError, from_os_error
from ..io import check_writable
from ..masks import Mask, sensitivity_scores
from ..masks.analysis import compare, density_table, fisher_mass, plot_layer_density
from ..model.load import build_model
from ..quant.layers import is_quantized_folder
from ..resources import memory_report
from .common import (calibration, check_common, emit, mask_source, memory_text, model_and_mask, refuse_existing,
                     train_split)
from .options import add_command, add_json_arg, add_mask_command_args


def register(sub) -> None:
    pm = add_command(sub, "mask", "compute and inspect masks").add_subparsers(dest="mask_command", required=True,
                                                                             metavar="SUBCOMMAND")
    p = add_command(pm, "compute", "compute a mask file (prints time, peak memory, Fisher mass)")
    add_mask_command_args(p, quant=True, selection=True)[1].add_argument("--out", required=True,
                                                                         help="output mask.safetensors")
    p.set_defaults(func=run_compute)
    p = add_command(pm, "info", "per-layer and per-module density of a mask file")
    p.add_argument("file", help="mask.safetensors")
    p.add_argument("--plot", default=None, help="also write a per-layer density chart (PNG) here (default: none)")
    add_json_arg(p)
    p.set_defaults(func=run_info)
    p = add_command(pm, "compare", "Jaccard overlap of two mask files, overall and per layer/module")
    p.add_argument("a", help="first mask.safetensors")
    p.add_argument("b", help="second mask.safetensors")
    add_json_arg(p)
    p.set_defaults(func=run_compare)
    p = add_command(pm, "mass", "share of the total Fisher score held by the top d of weights")
    add_mask_command_args(p, quant=False, selection=False)
    p.set_defaults(func=run_mass)


def run_compute(args: argparse.Namespace) -> None:
    check_common(args)
    refuse_existing(args.out)
    check_writable(args.out)  # before the model loads and the scores take minutes
    quantized = args.model is not None and Path(args.model).is_dir() and is_quantized_folder(Path(args.model))
    if args.quant or quantized:  # the score over a 4-bit base: the bf16 weights never need to fit at once
        source = mask_source(args, train_split(args))
        if isinstance(source, Mask):
            raise SparseZOError(f"mask compute scores a rule over a 4-bit base; --mask {args.mask} is a file, not a "
                                "rule: name a rule (e.g. --mask sensitive)")
        # a quantized folder (sparsezo quantize) loads as it is: the rule scores its 4-bit layers, their exact
        # entries at their exact values; it does not copy the mask the folder was built with
        model, tok, _ = build_model(args.model, args.dtype, args.device, None if quantized else args.quant)
        mask = source(model, tok)
    else:
        _, _, mask = model_and_mask(args, train_split(args))
    info = {k: mask.meta.get(k) for k in ("rule", "density", "scope", "num_trainable", "num_eligible", "source")}
    info.update(mask.stats, **memory_report(args.device), out=args.out, quantized_base=bool(args.quant or quantized))
    text = (f"{mask.rule}: {mask.num_trainable} of {mask.num_eligible} weights in {mask.stats.get('seconds', 0):.1f}s, "
            f"{memory_text(info)} -> {args.out}")
    if "fisher_mass" in mask.stats:
        text += "\nFisher mass held by the top d: " + ", ".join(f"{d}: {m:.3f}" for d, m in mask.stats["fisher_mass"].items())
    mask.save(args.out)
    emit(args, info, text)


def by_layer(rows: dict[str, Any]) -> list[tuple[str, Any]]:
    """Per-layer rows in model order (0, 1, 2, ..., 10, not 0, 1, 10 as strings sort); rows of tensors
    outside the decoder layers (key "None") last."""
    return sorted(rows.items(), key=lambda kv: (0, int(kv[0]), "") if kv[0].isdigit() else (1, 0, kv[0]))


def run_info(args: argparse.Namespace) -> None:
    mask = Mask.load(args.file)
    table = density_table(mask)
    if args.plot:
        try:
            plot_layer_density(mask, args.plot)
        except OSError as e:
            raise from_os_error(e, "cannot write the --plot chart", flag="--plot") from e
    obj = {"rule": mask.rule, "density": mask.meta.get("density"), "scope": mask.meta.get("scope"),
           "source": mask.meta.get("source"), "num_trainable": mask.num_trainable, "num_eligible": mask.num_eligible,
           **table}
    lines = [f"{'group':>14} {'trainable':>10} {'numel':>11} {'density':>9}"]
    for kind in ("layers", "modules"):
        rows = by_layer(table[kind]) if kind == "layers" else table[kind].items()
        lines += [f"{kind[:-1] + ' ' + k:>14} {r['trainable']:>10} {r['numel']:>11} {r['density']:9.5f}"
                  for k, r in rows]
    lines.append(f"{'total':>14} {mask.num_trainable:>10} {mask.num_eligible:>11} "
                 f"{mask.num_trainable / mask.num_eligible:9.5f}   rule {mask.rule}, scope {mask.meta.get('scope')}")
    if args.plot:
        obj["plot"] = str(args.plot)
        lines.append(f"per-layer density chart -> {args.plot}")
    emit(args, obj, "\n".join(lines))


def run_compare(args: argparse.Namespace) -> None:
    res = compare(Mask.load(args.a), Mask.load(args.b))
    lines = [f"Jaccard overlap {res['jaccard']:.4f} ({res['intersection']} shared of {res['a']} and {res['b']})"]
    lines += [f"  layer {k:>3}: {v:.4f}" for k, v in by_layer(res["layers"])]
    lines += [f"  {k:>9}: {v:.4f}" for k, v in res["modules"].items()]
    emit(args, res, "\n".join(lines))


def run_mass(args: argparse.Namespace) -> None:
    check_common(args)
    if args.mask not in ("sensitive", "sensitive-task"):
        raise SparseZOError("mask mass needs --mask sensitive (calibration text) or sensitive-task")
    train = train_split(args)
    model, tok, _ = build_model(args.model, args.dtype, args.device)
    texts, source = calibration(args, train)
    scores = sensitivity_scores(model, tok, texts, include=args.include, exclude=args.exclude,
                                calib_tokens=args.calib_tokens, seq_len=args.calib_seq_len)
    mass = fisher_mass(scores)
    emit(args, {"source": source, "mass": mass},
         "\n".join([f"{'density':>8} {'Fisher mass':>11}"] + [f"{d:>8} {m:11.4f}" for d, m in mass.items()]))
