"""``sparsezo bench``: what a ZO step costs compared with the two forward passes it needs.

The input is a synthetic batch of B rows × T tokens (seeded random ids) scored like a
classification task (cross-entropy over two candidates at the last position), so any model
and sequence length can be measured without data. Step and two-forward times are measured
alternately and compared as medians: CPU speed on a shared machine drifts by ±30% over
seconds, and interleaving keeps that drift out of the ratio.

:func:`bench_fused` adds the fused ±ε step (one forward over the stacked batch) to the same
interleaved rounds; ``sparsezo bench --compare bf16,int4,nf4`` runs it for each base in turn
in one process (one model loaded at a time, so a 7B comparison fits in memory).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .masks import Mask
from .resources import memory_report, peak_memory_bytes, start_memory_tracking
from .eval.scoring import Encoded, batch_loss, make_batch
from .zo import TrainableParams, ZOConfig, ZOEngine
from .zo.fused import FusedPM, PMLoss
from .zo.mezo import MeZOReference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(model: nn.Module, batch: int, seq_len: int, seed: int = 0):
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=g).tolist()
    enc = [Encoded(row, [[1], [2]], 0) for row in ids]
    return make_batch(enc, 0, device=next(model.parameters()).device)


def _interleaved(step: Callable[[], Any], loss: Callable[[], Any], repeats: int, device) -> tuple[list, list]:
    t = _interleaved_many({"step": step, "pair": lambda: (loss(), loss())}, repeats, device)
    return t["step"], t["pair"]


def _interleaved_many(fns: dict[str, Callable[[], Any]], repeats: int, device) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per round, the rounds alternating them (after one warm-up round)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def bench_fused(model: nn.Module, mask: Mask, batch: int = 16, seq_len: int = 256, repeats: int = 10,
                eps: float = 1e-2, dist: str = "gaussian") -> dict[str, Any]:
    """Time, interleaved: one forward, the unfused step (two forwards), and the fused step
    (one forward over the batch stacked on itself, zo/fused.py); ratios to two forwards."""
    device = next(model.parameters()).device
    b = synthetic_batch(model, batch, seq_len)
    loss = PMLoss(model, b)
    params = TrainableParams(model, mask)
    theta0 = params.theta.clone()
    fused = FusedPM(model, params)
    plain = ZOEngine(params, ZOConfig(lr=1e-9, eps=eps, dist=dist), 10**9)
    joint = ZOEngine(params, ZOConfig(lr=1e-9, eps=eps, dist=dist), 10**9, fused=fused)
    counter = iter(range(10**9))
    try:
        t = _interleaved_many({"pair": lambda: (loss(), loss()), "step": lambda: plain.step(next(counter), loss),
                               "fused": lambda: joint.step(next(counter), loss)}, repeats, device)
    finally:
        fused.remove()
        params.theta.copy_(theta0)
        params.restore()
    pair, step, fstep = (statistics.median(t[k]) for k in ("pair", "step", "fused"))
    return {"forward_ms": pair / 2 * 1000, "step_ms": step * 1000, "fused_step_ms": fstep * 1000,
            "step_over_two_forwards": step / pair, "fused_over_two_forwards": fstep / pair,
            "fused_over_step": fstep / step, "tokens_per_s": batch * seq_len / step,
            "fused_tokens_per_s": batch * seq_len / fstep, "trainable": params.numel, "batch": batch, "seq_len": seq_len,
            "repeats": repeats, **memory_report(device)}


def bench(model: nn.Module, mask: Mask, batch: int = 16, seq_len: int = 256, repeats: int = 10,
          eps: float = 1e-2, dist: str = "gaussian", baseline: str | None = None) -> dict[str, Any]:
    """Time a sparsezo ZO step (and optionally MeZO's reference step) against two forwards."""
    device = next(model.parameters()).device
    start_memory_tracking()  # peak anonymous memory from here on (the CLI starts it before loading)
    b = synthetic_batch(model, batch, seq_len)
    loss = lambda: batch_loss(model, b)  # noqa: E731
    params = TrainableParams(model, mask)
    theta0 = params.theta.clone()  # the model is handed back exactly as it came
    engine = ZOEngine(params, ZOConfig(lr=1e-9, eps=eps, dist=dist), 10**9)
    counter = iter(range(10**9))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, pairs = _interleaved(lambda: engine.step(next(counter), loss), loss, repeats, device)
    t = time.perf_counter()
    engine._perturb(1, eps)
    _sync(device)
    perturb_s = time.perf_counter() - t
    out = _summary(steps, pairs, batch * seq_len)
    out.update(perturb_ms=perturb_s * 1000, **memory_report(device), trainable=params.numel,
               batch=batch, seq_len=seq_len, device=str(device), dtype=str(params.dtype).removeprefix("torch."))
    if baseline == "mezo":
        ref = MeZOReference(params, eps, 1e-9)
        seeds = iter(range(10**9))
        steps, pairs = _interleaved(lambda: ref.step(next(seeds), loss), loss, repeats, device)
        t = time.perf_counter()
        ref._pass(1, eps)
        _sync(device)
        perturb_s = time.perf_counter() - t
        ref._pass(1, -eps)
        out["baseline"] = dict(_summary(steps, pairs, batch * seq_len), perturb_ms=perturb_s * 1000,
                               peak_memory_bytes=peak_memory_bytes(device), name="mezo")
    params.theta.copy_(theta0)
    params.restore()  # also undoes the reference's in-place bf16 drift
    return out


def _summary(steps: list[float], pairs: list[float], tokens: int) -> dict[str, float]:
    step, pair = statistics.median(steps), statistics.median(pairs)
    return {"forward_ms": pair / 2 * 1000, "step_ms": step * 1000, "step_over_two_forwards": step / pair,
            "tokens_per_s": tokens / step}
