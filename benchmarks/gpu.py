"""Issue 35's GPU table in one command: random-weight models built on the device from configs.

    python benchmarks/gpu.py                                  # CUDA, SmolLM2-135M + Llama-2-7B shapes, ≤ 8 min
    python benchmarks/gpu.py --device cpu --scale small       # the same rows on tiny shapes (< 2 min): proves it runs

Nothing but the code reaches the GPU machine: the weights are random (``LlamaConfig`` of each
architecture, built on the device), the batches synthetic (seeded token ids). Prints one JSON
object per row on stdout (progress on stderr); ``--out FILE`` also writes them as JSON lines.

Rows (``"row"``):

- ``step``: ZO step / two forwards (interleaved medians) for a 0.1% random mask and full ZO, with
  MeZO's reference loop (``baseline``) measured the same way; perturb ms a phase;
  ``peak_memory_bytes`` = CUDA ``max_memory_allocated`` of the row;
- ``forward``: ms of one scoring forward at 1×32, 1×256, 16×256 per base (bf16, nf4, int4); on CUDA
  also the decoder forward (``--cuda-graphs``' unit) eagerly (``eager_decoder_…``) and replayed as a
  CUDA graph (``graphed_…``; ``graph_reason`` says why not where capture failed);
- ``fused``: the fused ±ε step (one forward over the stacked batch) over two forwards;
- ``fisher``: Fisher-score time and peak memory over the bf16 and the 4-bit base (the 4-bit
  pass recomputes each layer's dense weight in backward), the top-k on the device;
- ``replay``: N steps trained on ``--device``, replayed on the CPU: the θ digests must match.

Rows needing bitsandbytes (nf4) report ``skipped`` with the reason where it is not installed;
a row that fails reports ``error`` and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Iterator

import torch

from sparsezo.bench import bench, bench_fused, synthetic_batch
from sparsezo.eval.graphs import GraphedDecoder
from sparsezo.masks import compute_mask
from sparsezo.masks.quantized import eligible_tensors
from sparsezo.masks.sensitive import plan_passes, squared_gradient_passes
from sparsezo.masks.topk import TopK
from sparsezo.resources import memory_report
from sparsezo.eval.scoring import batch_loss
from sparsezo.zo import TrainableParams, Trajectory, ZOConfig, ZOEngine

ARCHS = {  # (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
    "full": {"135m": (576, 1536, 30, 9, 3, 49152, True), "7b": (4096, 11008, 32, 32, 32, 32000, False)},
    "small": {"135m": (64, 192, 2, 4, 2, 512, True), "7b": (128, 384, 2, 4, 4, 1000, False)},
}
SHAPES = ((1, 32), (1, 256), (16, 256))


def build(arch: tuple, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama of ``arch`` built directly on ``device`` (no checkpoint needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, tied = arch
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=2048)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _quantize(model, quant: str, mask=None):
    from sparsezo.quant.convert import quantize_model

    return quantize_model(model, mask, quant=quant)


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _round(row: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else _round(v) if isinstance(v, dict) else v)
            for k, v in row.items()}


class Table:
    """Prints (and keeps) one JSON object per row; a failing row reports its error, the rest run."""

    def __init__(self, out: str | None):
        self.out = open(out, "w") if out else None  # noqa: SIM115 (closed in close())
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def row(self, **key) -> Iterator[dict]:
        row = dict(key)
        t = time.perf_counter()
        try:
            yield row
        except Exception as e:  # noqa: BLE001 — one failed row must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["row_seconds"] = round(time.perf_counter() - t, 1)
        line = json.dumps(_round(row), sort_keys=True)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()
        print(f"[{time.perf_counter() - self.t0:.0f} s] {key}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.out:
            self.out.close()


def median_ms(fn, repeats: int, device: str) -> float:
    """Median wall ms of ``fn()`` over ``repeats`` calls, synchronised around each on a GPU."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def forward_ms(model, shapes, repeats: int, device: str) -> dict:
    """Median ms of one scoring forward per B×T shape."""
    out = {}
    for b, t in shapes:
        batch = synthetic_batch(model, b, t)
        batch_loss(model, batch)
        out[f"{b}x{t}_ms"] = median_ms(lambda: batch_loss(model, batch), repeats, device)
        if torch.device(device).type == "cuda":  # the decoder forward, eager and replayed as a CUDA graph
            graphed = GraphedDecoder(model)
            graphed(batch)
            out[f"eager_decoder_{b}x{t}_ms"] = median_ms(lambda: graphed.eager(batch), repeats, device)
            ms = median_ms(lambda: graphed(batch), repeats, device)
            out[f"graphed_{b}x{t}_ms"] = ms if graphed.reason is None else None
            out["graph_reason"] = graphed.reason
            del graphed
    return out


def fisher(model, rows: torch.Tensor, micro_batch: int, density: float, memory_limit: int | None) -> dict:
    """The sensitive rule's scoring and top-k on the model's device (no tokenizer: token rows given)."""
    params = eligible_tensors(model)
    top = TopK({n: p.numel() for n, p in params.items()}, density)
    plan = plan_passes(model, params, rows.shape[0], rows.shape[1], micro_batch, 36 * top.capacity, memory_limit)
    t0 = time.perf_counter()
    squared_gradient_passes(model, params, rows, micro_batch, plan, top.offer)
    picked = top.indices()
    return {"seconds": time.perf_counter() - t0, "passes": len(plan["groups"]), "checkpointed": plan["checkpoint"],
            "calib_tokens": rows.numel(), "selected": sum(v.numel() for v in picked.values()),
            "memory_limit": plan["memory_limit"]}


def digest(params: TrainableParams) -> str:
    return hashlib.sha256(params.theta.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def replay_check(arch: tuple, device: str, dtype: torch.dtype, rule: str, dist: str, optimizer: str,
                 steps: int) -> dict:
    """Train ``steps`` on ``device``, replay the trajectory on a CPU copy of the base: θ digests compared."""
    model = build(arch, device, dtype)
    base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    mask = compute_mask(model, rule, 1e-3, seed=0)
    cfg = ZOConfig(lr=1e-4, eps=1e-2, dist=dist, optimizer=optimizer, q=2 if optimizer != "fzoo" else 4, seed=3)
    params = TrainableParams(model, mask)
    engine = ZOEngine(params, cfg, steps)
    batch = synthetic_batch(model, 2, 32)
    traj = Trajectory(meta={"zo": engine.config_dict()})
    for t in range(steps):
        traj.append(engine.step(t, lambda: batch_loss(model, batch)))
    trained = digest(params)
    del engine, params, model
    cpu_model = build(arch, "cpu", dtype)
    cpu_model.load_state_dict(base)
    replayed = TrainableParams(cpu_model, mask)
    t0 = time.perf_counter()
    traj.replay(replayed, ZOConfig(**traj.meta["zo"]))
    return {"trained_digest": trained, "replayed_cpu_digest": digest(replayed), "identical": trained == digest(replayed),
            "replay_seconds": time.perf_counter() - t0, "steps": steps}


def run(args) -> None:
    dev, dtype = args.device, getattr(torch, args.dtype)
    archs = ARCHS[args.scale]
    table = Table(args.out)
    repeats = args.repeats
    bnb = _has_bnb()
    quants = [q for q in ("nf4", "int4") if q != "nf4" or bnb]
    env = {"device": dev, "scale": args.scale, "dtype": args.dtype, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if torch.device(dev).type == "cuda" else None, "bitsandbytes": bnb}
    with table.row(row="env") as r:
        r.update(env)
    big_b, big_t = SHAPES[-1]

    # --- the 135M architecture: sparse and full ZO vs MeZO, forwards, fused, Fisher --------------------
    model = build(archs["135m"], dev, dtype)
    for rule in ("random", "full"):
        with table.row(row="step", arch="135m", base=args.dtype, mask="0.1%" if rule == "random" else "full",
                       shape=f"{big_b}x{big_t}") as r:
            _reset(dev)
            r.update(bench(model, compute_mask(model, rule, 1e-3, seed=0), big_b, big_t, repeats, baseline="mezo"))
    with table.row(row="forward", arch="135m", base=args.dtype) as r:
        r.update(forward_ms(model, SHAPES, repeats, dev))
    with table.row(row="fused", arch="135m", base=args.dtype, mask="0.1%", shape=f"1x32 and {big_b}x{big_t}") as r:
        mask = compute_mask(model, "random", 1e-3, seed=0)
        r["1x32"] = bench_fused(model, mask, 1, 32, repeats)
        r[f"{big_b}x{big_t}"] = bench_fused(model, mask, big_b, big_t, repeats)
    rows = torch.randint(3, 500, (args.calib_tokens // big_t, big_t), generator=torch.Generator().manual_seed(0))
    with table.row(row="fisher", arch="135m", base=args.dtype) as r:
        _reset(dev)
        r.update(fisher(model, rows, 8, 1e-3, None), **memory_report(dev))
    for quant in ("nf4", "int4"):
        with table.row(row="fisher", arch="135m", base=quant) as r:
            if quant not in quants:
                r["skipped"] = "bitsandbytes is not installed"
                continue
            q = _quantize(copy.deepcopy(model), quant)
            _reset(dev)
            r.update(fisher(q, rows, 8, 1e-3, None), **memory_report(dev))
            r["forward"] = forward_ms(q, SHAPES, repeats, dev)
            del q
    del model

    # --- cross-device replay: N steps here, replayed on the CPU --------------------------------------
    for dist in ("gaussian", "rademacher"):
        for optimizer in ("sgd", "adam", "hizoo", "fzoo"):
            with table.row(row="replay", arch="135m", base=args.dtype, mask="0.1%", dist=dist, optimizer=optimizer,
                           trained_on=dev, replayed_on="cpu") as r:
                r.update(replay_check(archs["135m"], dev, dtype, "random", dist, optimizer, args.replay_steps))
    with table.row(row="replay", arch="135m", base=args.dtype, mask="full", dist="gaussian", optimizer="sgd",
                   trained_on=dev, replayed_on="cpu") as r:
        r.update(replay_check(archs["135m"], dev, dtype, "full", "gaussian", "sgd", 2))

    # --- the Llama-2-7B architecture: bf16, then NF4/int4 bases --------------------------------------
    if args.skip_7b:
        table.close()
        return
    model = build(archs["7b"], dev, dtype)
    mask = compute_mask(model, "random", 1e-3, seed=0)
    with table.row(row="step", arch="7b", base=args.dtype, mask="0.1%", shape=f"{big_b}x{big_t}") as r:
        _reset(dev)
        r.update(bench(model, mask, big_b, big_t, repeats, baseline="mezo"))
    with table.row(row="forward", arch="7b", base=args.dtype) as r:
        r.update(forward_ms(model, SHAPES, repeats, dev))
    with table.row(row="fisher", arch="7b", base=args.dtype) as r:
        _reset(dev)
        r.update(fisher(model, rows, 8, 1e-3, None), **memory_report(dev))
    del model  # each 4-bit base is built afresh (same seed): its rows' peaks hold no dense model
    for quant in ("nf4", "int4"):
        if quant not in quants:
            with table.row(row="step", arch="7b", base=quant) as r:
                r["skipped"] = "bitsandbytes is not installed"
            continue
        q = _quantize(build(archs["7b"], dev, dtype), quant, mask)
        with table.row(row="step", arch="7b", base=quant, mask="0.1%", shape=f"{big_b}x{big_t}") as r:
            _reset(dev)
            r.update(bench(q, mask, big_b, big_t, repeats))
        with table.row(row="forward", arch="7b", base=quant) as r:
            r.update(forward_ms(q, SHAPES, repeats, dev))
        with table.row(row="fused", arch="7b", base=quant, mask="0.1%", shape="1x32") as r:
            r.update(bench_fused(q, mask, 1, 32, repeats))
        with table.row(row="fisher", arch="7b", base=quant, memory_limit_gib=args.fisher_limit_gib) as r:
            _reset(dev)
            # the plan bounds the Fisher's working memory; the model's own bytes come off the device's bound
            cuda = torch.device(dev).type == "cuda"
            limit = int(args.fisher_limit_gib * 2**30) - torch.cuda.memory_allocated() if cuda else None
            r.update(fisher(q, rows, 8, 1e-3, limit), **memory_report(dev))
        del q
    table.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=tuple(ARCHS), default="full", help="full: the real architectures; small: tiny ones")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="default: bfloat16 on CUDA, float32 on CPU (a CPU without bf16 matmul is ~5x slower in bf16)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per timing (default 10 full, 3 small)")
    ap.add_argument("--calib-tokens", type=int, default=None, help="Fisher tokens (default 8192 full, 1024 small)")
    ap.add_argument("--fisher-limit-gib", type=float, default=8.0, help="device memory bound of the 4-bit Fisher")
    ap.add_argument("--replay-steps", type=int, default=5)
    ap.add_argument("--skip-7b", action="store_true", help="only the 135M-architecture rows")
    ap.add_argument("--out", default=None, help="also write the rows as JSON lines to this file")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    args.repeats = args.repeats or (10 if args.scale == "full" else 3)
    args.calib_tokens = args.calib_tokens or (8192 if args.scale == "full" else 1024)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sparsezo: error: --device cuda but no CUDA device is available; pass --device cpu")
    run(args)


if __name__ == "__main__":
    main()
