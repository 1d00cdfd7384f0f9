"""The training recipe: data → ZO steps → dev selection → test; a plain loop, no framework.

:func:`fine_tune` is the API; ``sparsezo train`` and ``sparsezo demo`` are thin wrappers.
MeZO's protocol: evaluate on the dev split every ``eval_every`` steps (and before training),
keep the best θ (cheap: θ is small), report test accuracy of that θ.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import Delta, TrainState, check_resumable, save_checkpoint
from .errors import SparseZOError, os_hint
from .io import write_json, write_text
from .evaluate import evaluate as evaluate_split
from .scoring import LOSSES, encode, make_batch
from .tasks import Example, Task
from .zo import StepRecord, TrainableParams, Trajectory, ZOConfig, ZOEngine
from .zo.fused import FusedPM, PMLoss

if TYPE_CHECKING:
    from .distributed import DistContext

_log = logging.getLogger("sparsezo")
DRIFT_WARN = 10.0  # warn when RMS(θ − θ₀) exceeds this many times RMS(θ₀): the weights are being overwritten


@dataclass
class TrainConfig:
    """The loop's own settings; the optimiser's are in :class:`ZOConfig`."""

    steps: int = 500
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 32
    loss: str = "ce"
    keep_best: bool = True  # MeZO: return the θ with the best dev accuracy, not the last one
    fused_pm: bool = False  # both perturbed forwards of a step as one stacked forward (zo/fused.py)
    zo: ZOConfig = field(default_factory=ZOConfig)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Integral):
                raise SparseZOError(f"--{name.replace('_', '-')} must be a whole number, got {getattr(self, name)!r}")
            if getattr(self, name) <= 0:
                raise SparseZOError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise SparseZOError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        self.zo.validate()


@dataclass
class TrainResult:
    best_step: int
    best_dev: float  # best dev value of the task metric (accuracy, or F1 for generation tasks)
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    trajectory: Trajectory


class DriftWatch:
    """Warns once when θ has moved implausibly far from where it started, for the lr in use.

    A sparse fine-tune nudges weights; when the RMS distance RMS(θ − θ₀) exceeds ``DRIFT_WARN``
    times the RMS of the trained weights themselves, the update has replaced them with noise
    (e.g. --lr 1e3 drives |θ| to 1e6 while a bounded loss stays finite). That is not an error —
    a user may mean it — but it must not pass unnoticed. Checked every ``every`` steps: one pass
    over θ, negligible next to the forwards of those steps.

    θ₀ is kept in the compute dtype: it *is* the base weights, exactly, at a half of θ's bytes
    for bf16 (full ZO trains every eligible weight, so a second fp32 θ would not be cheap).
    Sums run in float64 over chunks: |θ| ~ 1e37 squares to inf in fp32.
    """

    CHUNK = 1 << 22

    def __init__(self, theta0: torch.Tensor, dtype: torch.dtype, every: int = 10):
        self.theta0, self.every, self.warned = theta0.to(dtype, copy=True), every, False
        self.scale = max(self._rms(theta0), 1e-8)

    def _rms(self, t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
        total = 0.0
        for s in range(0, t.numel(), self.CHUNK):
            d = t[s : s + self.CHUNK].double()
            if minus is not None:
                d = d - minus[s : s + self.CHUNK].double()
            total += d.pow(2).sum().item()
        return math.sqrt(total / max(t.numel(), 1))

    def check(self, theta: torch.Tensor, step: int, lr: float) -> None:
        if self.warned or step % self.every:
            return
        drift = self._rms(theta, self.theta0)
        if not math.isnan(drift) and drift > DRIFT_WARN * self.scale:
            self.warned = True
            _log.warning("warning: after %d steps the trained weights moved %.3g (RMS) from their start, %.3gx their "
                         "own RMS %.3g: lr %g is implausibly large for them; the fine-tune is likely destroying the "
                         "model, lower --lr", step, drift, drift / self.scale, self.scale, lr)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Examples of a step: consecutive slices of per-epoch seeded permutations (resumable by step)."""

    perms: dict[int, np.ndarray] = {}
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch = j // n
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][j % n]))
    return out


def fine_tune(
    model,
    tokenizer,
    params: TrainableParams,
    train: list[Example],
    dev: list[Example],
    cfg: TrainConfig,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    task: Task | None = None,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 1,
    resume: TrainState | None = None,
    dist: DistContext | None = None,
    on_eval: Callable[[int], dict[str, Any]] | None = None,
    tensorboard: str | Path | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` ZO steps on ``train``; on return ``params`` hold the best-dev (or last) θ.

    Dev selection uses ``task``'s metric (F1 for generation tasks); ``None`` means accuracy.
    With ``run_dir`` and ``checkpoint_every``, a checkpoint is written every that many steps and
    after the last one; ``resume`` continues from one, giving bit-identical results to a run
    that was never interrupted (batches and noise depend only on (seed, step)).

    With ``dist`` (one call per process, see :mod:`sparsezo.distributed`) the steps are data- or
    query-parallel, every rank ends with the same θ, and only rank 0 writes metrics and
    checkpoints and shows the progress bar. Every rank evaluates the whole dev set and takes
    rank 0's value, so the best-dev θ is the same everywhere.

    ``on_eval(step)`` runs after each dev evaluation, with the model holding that step's θ; the
    values it returns are added to that step's metrics row (e.g. a held-out curve that must not
    steer selection). It is not called again on resume for steps already logged.
    ``tensorboard`` (a log folder) mirrors every metrics row there as TensorBoard scalars.
    """
    from .models import model_fingerprint

    cfg.validate()
    if not train or not dev:
        raise SparseZOError("training needs non-empty train and dev splits; raise --num-train/--num-dev")
    fingerprint = model_fingerprint(model)  # base θ and model, recorded in checkpoints (refused on resume if changed)
    fused = None
    if dist is None:
        fused = FusedPM(model, params) if cfg.fused_pm else None
        engine = ZOEngine(params, cfg.zo, cfg.steps, fused=fused)
    else:
        from .distributed import DistributedEngine, check_consistent, check_split

        check_split(dist.parallel, dist.world, cfg.zo.q, cfg.batch_size)
        check_consistent(dist, model, params, cfg, train, dev, resume.theta if resume else params.theta,
                         resume.opt_state if resume else {})
        engine = DistributedEngine(params, cfg.zo, cfg.steps, dist)
        if not dist.is_main:
            metrics_path, progress, run_dir, tensorboard = None, False, None, None
    if resume:  # before anything is written: a refused resume must leave the run as it was
        check_resumable(resume, params, engine.opt.state, fingerprint)
    device = params.theta.device
    encoded = encode(tokenizer, train)
    pad = tokenizer.pad_token_id
    history: list[dict[str, Any]] = list(resume.history) if resume else []
    if metrics_path:  # rewritten from the checkpoint's history on resume: no rows from after it
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    metrics = open(metrics_path, "a") if metrics_path else None
    if tensorboard:
        from .tensorboard import TensorBoardLog

        board = TensorBoardLog(tensorboard)
    else:
        board = None

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        if board:
            board.log(row)
        if metrics:
            try:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            except OSError as e:  # file.write's OSError names no file; the last checkpoint stays resumable
                raise SparseZOError(f"cannot write {metrics_path} ({e.strerror}); {os_hint(e.errno)}") from e

    def evaluate(step: int) -> float:
        # its own bar (the step bar's rate must not absorb a dev pass, nor step 0's look like a hang)
        desc = f"dev @ step {step}" if progress else None
        res = evaluate_split(model, tokenizer, task, dev, cfg.eval_batch_size, desc=desc)
        value = res["value"] if dist is None else dist.from_main(res["value"], f"dev evaluation at step {step}")
        row = {"step": step, f"dev_{res['metric']}": value}
        if on_eval is not None:
            row.update(on_eval(step))
        log(row)
        return value

    t0 = time.perf_counter()
    drift = DriftWatch(params.theta, params.dtype)
    if resume:
        params.theta.copy_(resume.theta)
        params.restore()
        for k, v in resume.opt_state.items():
            engine.opt.state[k].copy_(v)
        best_acc, best_step, best_theta = resume.best_value, resume.best_step, resume.best_theta.clone()
        trajectory, start, t0 = resume.trajectory, resume.step, t0 - resume.seconds
    else:
        best_acc, best_step, best_theta = evaluate(0), 0, params.theta.clone()
        trajectory, start = Trajectory(), 0
    bar = tqdm(range(start, cfg.steps), desc="zo", unit="step", disable=not progress, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    running = None
    try:
        for step in bar:
            idx = batch_indices(cfg.zo.seed, step, len(encoded), cfg.batch_size)
            idx = idx if dist is None else dist.shard(idx)
            b = make_batch([encoded[i] for i in idx], pad, device=device)
            loss = PMLoss(model, b, cfg.loss)
            rec: StepRecord = engine.step(step, loss) if dist is None else engine.step(step, loss, len(idx))
            trajectory.append(rec)
            running = rec.loss if running is None else 0.95 * running + 0.05 * rec.loss
            log({"step": step + 1, "loss": rec.loss, "grad": rec.grads, "seed": rec.seeds, "lr": rec.lr})
            drift.check(params.theta, step + 1, rec.lr)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                acc = evaluate(step + 1)
                bar.unpause()  # the step rate and ETA count ZO steps only, not the dev pass just shown
                if acc > best_acc or not cfg.keep_best:
                    best_acc, best_step, best_theta = acc, step + 1, params.theta.clone()
            if run_dir and checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(run_dir, TrainState(step + 1, params.theta, engine.opt.state, best_acc, best_step,
                                                    best_theta, trajectory, history, time.perf_counter() - t0,
                                                    params.mask.digest(), fingerprint),
                                keep=keep_checkpoints)
            bar.set_postfix(loss=f"{running:.4f}", dev=f"{best_acc:.3f}")
    finally:
        bar.close()
        if fused:
            fused.remove()
        if metrics:
            metrics.close()
        if board:
            board.close()
    params.theta.copy_(best_theta)
    params.restore()
    return TrainResult(best_step, best_acc, history, time.perf_counter() - t0, cfg.steps, trajectory)


def run_meta(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of a run: every setting needed to reproduce it."""
    return {"train": {k: v for k, v in asdict(cfg).items() if k != "zo"}, "zo": asdict(cfg.zo), **extra}


def save_delta(params: TrainableParams, path: str | Path, meta: dict[str, Any]) -> Delta:
    delta = Delta.from_params(params, meta)
    delta.save(path)
    return delta


def trajectory_meta(params: TrainableParams, cfg: ZOConfig, best_step: int, delta_meta: dict[str, Any]) -> dict[str, Any]:
    """What replay needs beside the steps: the update rule, which θ it applies to, where to stop,
    and the delta's header (so the replayed file is byte-identical to the trained one)."""
    return {"zo": asdict(cfg), "dtype": str(params.dtype).removeprefix("torch."), "mask_digest": params.mask.digest(),
            "fingerprint": params.mask.meta.get("fingerprint"), "best_step": best_step, "delta_meta": delta_meta}


def save_run(out: str | Path, params: TrainableParams, trajectory: Trajectory, zo: ZOConfig,
             delta_meta: dict[str, Any], config: dict[str, Any]) -> None:
    """The final files of a run, each atomic; ``delta.safetensors`` last, as it marks the run complete.

    ``params`` must hold the selected (best-dev) θ; ``delta_meta`` must not hold timings, so a
    resumed or replayed run writes the same bytes.
    """
    out = Path(out)
    trajectory.meta = trajectory_meta(params, zo, delta_meta["results"]["best_step"], delta_meta)
    trajectory.save(out / "trajectory.safetensors")
    write_json(out / "config.json", config)
    save_delta(params, out / "delta.safetensors", delta_meta)

