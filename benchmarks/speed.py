"""Issue 20's speed targets: 4-bit layer vs dense, fused vs unfused ZO step, eval padding.

    python benchmarks/speed.py --parts layer,default,padding          # default model, ~5 min
    python benchmarks/speed.py --parts 7b --model-7b DIR --mask-7b FILE  # a 7B-shaped checkpoint

Prints one JSON object (``--out FILE`` also writes it, merged into what the file already holds,
part by part). Every comparison is an interleaved median (CPU speed on a shared machine drifts
by ±30% over seconds), and each part records the load average it ran under.

- ``layer``: one linear of the Llama-2-7B MLP shapes (11008×4096, 4096×11008) at T tokens: dense
  bf16 ``F.linear``, the int4 layer with its 0.1% exact entries (this machine's path: the compiled
  AMX kernel where it works, plus the sparse correction), its 4-bit matmul alone, ATen's eager
  int4 kernel, and the bitsandbytes NF4 layer. Target: int4 / dense ≤ 1.2 at T=32.
- ``default``: the default model, random 0.1% mask, fused and unfused step vs two forwards for
  bf16, int4, nf4 (``sparsezo.bench.bench_fused``). Target: unfused step ≤ 1.03 × two forwards.
- ``7b``: the same on a 7B-architecture checkpoint (``benchmarks/scale_7b.py --stages build``)
  with its mask, int4 base, at b1×32 (target: fused step ≤ 0.65 × two unfused forwards).
- ``padding``: share of padded positions of the evaluation forwards (32 a batch) per task with
  data, length-bucketed vs input order.
- ``train_padding``: the same for the training steps of the demo recipe (seed 0, 16 a step), one
  padded batch per step vs length-bucketed micro-batches (``sparsezo.eval.scoring.micro_batches``), with
  the token positions and forwards each computes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _medians(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def part_layer(tokens: list[int], repeats: int) -> dict:
    """ms per matmul of one 7B-MLP-shaped layer, each 4-bit path over dense bf16."""
    from sparsezo.quant import NF4Linear
    from sparsezo.quant import int4

    out = {"load_before": _load()}
    for n, k in ((11008, 4096), (4096, 11008)):
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        idx = torch.randperm(n * k, generator=g)[: n * k // 1000].sort().values  # 0.1% exact entries
        layer = int4.Int4Linear.from_linear(w, None, idx, torch.bfloat16)
        aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4.unpack(layer.qweight).int(), 1)
        nf4 = NF4Linear.from_linear(w, None, idx, torch.bfloat16)
        for t in tokens:
            x = torch.randn(t, k, dtype=torch.bfloat16, generator=g)
            with torch.no_grad():
                ms = _medians({
                    "dense_bf16": lambda: F.linear(x, w),
                    "int4": lambda: layer(x),
                    "int4_matmul_only": lambda: layer.base_mm(x),
                    "int4_eager_aten": lambda: int4._mm(x, aten, layer.scales_zeros, layer.group),
                    "nf4_bnb": lambda: nf4(x),
                }, repeats)
            row = {f"{key}_ms": round(v, 2) for key, v in ms.items()}
            row.update({f"{key}_over_dense": round(v / ms["dense_bf16"], 3) for key, v in ms.items() if key != "dense_bf16"})
            row["int4_path"] = "compiled-amx" if int4._COMPILED.get((n, k, int4.GROUP)) else "eager-aten"
            out[f"{n}x{k}_T{t}"] = row
            print(f"layer {n}x{k} T={t}: {row}", file=sys.stderr, flush=True)
    out["load_after"] = _load()
    return out


def _compare(model_dir: str | None, mask, bases: list[str], shapes: list[tuple[int, int]], repeats: int) -> dict:
    import gc

    from sparsezo.bench import bench_fused
    from sparsezo.model.load import load_model
    from sparsezo.quant.convert import quantize_model
    from sparsezo.quant.layers import is_quantized_folder

    out = {}
    for base in bases:
        quant = None if base == "bf16" else base
        if model_dir and is_quantized_folder(model_dir) != bool(quant):
            continue
        streamed = quant and model_dir is not None and not callable(mask)
        model, tok = load_model(model_dir, quant=quant if streamed else None, mask=mask if streamed else None)
        m = mask(model) if callable(mask) else mask
        if quant and not streamed:
            quantize_model(model, m, quant=quant)
        for b, t in shapes:
            load = _load()
            r = bench_fused(model, m, b, t, repeats)
            r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            r["load_before"] = load
            out[f"{base}_b{b}x{t}"] = r
            print(f"{base} b{b}x{t}: fwd {r['forward_ms']:.0f} ms, step/2fwd {r['step_over_two_forwards']:.3f}, "
                  f"fused/2fwd {r['fused_over_two_forwards']:.3f} (load {load})", file=sys.stderr, flush=True)
        del model
        gc.collect()
    return out


def part_default(repeats: int) -> dict:
    from sparsezo.masks import compute_mask

    return _compare(None, lambda model: compute_mask(model, "random", 1e-3, seed=0), ["bf16", "int4", "nf4"],
                    [(16, 256), (1, 32), (16, 64)], repeats)


def part_7b(model_dir: str, mask_file: str, bases: list[str], shapes: list[tuple[int, int]], repeats: int) -> dict:
    from sparsezo.masks import Mask

    return _compare(model_dir, Mask.load(mask_file), bases, shapes, repeats)


def part_padding(batch_size: int) -> dict:
    from sparsezo.model.load import load_model
    from sparsezo.eval.scoring import padding_fraction
    from sparsezo.tasks import get_task

    _, tok = load_model()  # the default model's tokenizer
    out = {}
    for name in ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record"):
        try:
            splits = get_task(name).splits(0, 1000, 500, 1000)
        except Exception as e:  # noqa: BLE001 — a task without data here is reported, not fatal
            out[name] = {"error": str(e).splitlines()[0]}
            continue
        ex = splits["test"]
        out[name] = {"n": len(ex), "bucketed": round(padding_fraction(tok, ex, batch_size), 4),
                     "input_order": round(padding_fraction(tok, ex, batch_size, bucketed=False), 4)}
        print(f"padding {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def part_train_padding() -> dict:
    from sparsezo import load_model
    from sparsezo import DEMO
    from sparsezo.eval.scoring import encode, micro_batches
    from sparsezo.tasks import get_task
    from sparsezo.training.batches import batch_indices

    _, tok = load_model()  # the default model's tokenizer
    out = {}
    for name in ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record"):
        try:
            train = get_task(name).splits(DEMO.seed, DEMO.num_train, DEMO.num_dev, DEMO.num_test)["train"]
        except Exception as e:  # noqa: BLE001 — a task without data here is reported, not fatal
            out[name] = {"error": str(e).splitlines()[0]}
            continue
        enc = encode(tok, train)
        row = {"steps": DEMO.steps, "batch_size": DEMO.batch_size}
        for label, bucketed in (("one_batch", False), ("bucketed", True)):
            cells = real = forwards = 0
            for step in range(DEMO.steps):
                idx = batch_indices(DEMO.seed, step, len(enc), DEMO.batch_size)
                for b in micro_batches([enc[i] for i in idx], tok.pad_token_id or 0, bucketed=bucketed):
                    cells += b.attention_mask.numel()
                    real += int(b.attention_mask.sum())
                    forwards += 1
            row[label] = {"padding": round(1 - real / cells, 4), "positions": cells, "forwards": forwards}
        out[name] = row
        print(f"train padding {name}: {row}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="layer,default,padding", help="comma-separated: layer, default, 7b, padding, train_padding")
    ap.add_argument("--tokens", default="1,32,256", help="token counts for the layer part")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per comparison")
    ap.add_argument("--model-7b", default="/tmp/sparsezo-7b-32/bf16", help="7B-architecture checkpoint (or int4 folder)")
    ap.add_argument("--mask-7b", default="/tmp/sparsezo-7b-32/mask.safetensors")
    ap.add_argument("--bases-7b", default="int4", help="bases for the 7b part (bf16, int4, nf4)")
    ap.add_argument("--shapes-7b", default="1x32", help="BxT list for the 7b part, e.g. 1x32,1x256,16x64")
    ap.add_argument("--out", default=None, help="also merge the result into this JSON file")
    args = ap.parse_args()
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        if part == "layer":
            res[part] = part_layer([int(t) for t in args.tokens.split(",")], args.repeats)
        elif part == "default":
            res[part] = part_default(args.repeats)
        elif part == "7b":
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes_7b.split(",")]
            res[part] = part_7b(args.model_7b, args.mask_7b, args.bases_7b.split(","), shapes, args.repeats)
        elif part == "padding":
            res[part] = part_padding(32)
        elif part == "train_padding":
            res[part] = part_train_padding()
        else:
            raise SystemExit(f"unknown part {part!r}")
        res[part]["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        from sparsezo.io import write_json

        old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        write_json(args.out, {**old, **res})
    print(json.dumps(res, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
