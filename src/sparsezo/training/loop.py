"""The training recipe: data → ZO steps → dev selection → test; a plain loop, no framework.

:func:`fine_tune` is the API; ``sparsezo train`` and ``sparsezo demo`` are thin wrappers.
MeZO's protocol: evaluate on the dev split every ``eval_every`` steps (and before training),
keep the best θ (cheap: θ is small), report test accuracy of that θ.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import SparseZOError, os_hint
from ..eval.evaluate import evaluate as evaluate_split
from ..eval.graphs import GraphedDecoder, bucket
from ..eval.scoring import Encoded, encode, micro_batches
from ..io import write_text
from ..model.params import model_fingerprint
from ..quant import QUANT_LAYERS
from ..tasks import Example, Task
from ..tensorboard import TensorBoardLog
from ..zo import StepRecord, TrainableParams, Trajectory, ZOEngine
from ..zo.fused import FusedPM, PMLoss
from ..zo.guards import DriftGuard, check_eps, weight_scale
from ..zo.registry import OPTIMIZERS
from .batches import batch_indices
from .checkpoint import TrainState, check_resumable, save_checkpoint
from .config import FUSED_AUTO_TOKENS, TrainConfig, TrainResult
from .distributed import DistContext, DistributedEngine, check_consistent, check_one_process, check_split
from .lr_probe import probe_lr
from .outcome import Outcome, at_ceiling, better, start_row

_log = logging.getLogger("sparsezo")
def fused_engine(model: torch.nn.Module, params: TrainableParams, cfg: TrainConfig) -> FusedPM | None:
    """The step's fused ±ε forward for ``cfg.fused_pm``: always (on), never (off), or (auto) on
    4-bit layers for batches of at most ``FUSED_AUTO_TOKENS`` positions, where it measured faster.
    Deterministic: the choice depends on the model and each batch's shape, never on timings."""
    if cfg.fused_pm == "on":
        return FusedPM(model, params)
    quantized = any(isinstance(m, QUANT_LAYERS) for m in model.modules())
    if (cfg.fused_pm == "auto" and quantized and not OPTIMIZERS[cfg.zo.optimizer].one_sided
            and FusedPM.supports(model, params)):
        return FusedPM(model, params, max_tokens=FUSED_AUTO_TOKENS)
    return None


def graphed_decoder(model: torch.nn.Module, cfg: TrainConfig, fused: FusedPM | None,
                    encoded: list[Encoded]) -> GraphedDecoder | None:
    """The unfused steps' decoder forward for ``cfg.cuda_graphs`` (None: eager). Off CUDA it warns that the
    flag does nothing (the run is then the one without it); with ``--fused-pm on`` every step is scored fused,
    whose hooks need the eager forward. Rows are capped at a step's most (one row per candidate at worst)."""
    if not cfg.cuda_graphs:
        return None
    device = next(model.parameters()).device
    if device.type != "cuda":
        _log.warning("warning: --cuda-graphs has no effect off CUDA (the model is on %s); training eagerly", device)
        return None
    if fused is not None and fused.max_tokens is None:
        _log.info("--cuda-graphs: unused, --fused-pm on scores every step in one stacked forward, which stays eager")
        return None
    return GraphedDecoder(model, max_rows=bucket(cfg.batch_size * max(len(e.cands) for e in encoded), 1))


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

    With ``cfg.lr_auto`` the lr is first chosen by :func:`probe_lr` (its report is the first
    metrics row, so a resumed run reuses it instead of probing again). ``cfg`` is never changed:
    the result's ``zo`` holds the settings the run trained with (the chosen lr included). The
    result says whether anything was learned (``improved``, see :mod:`sparsezo.training.outcome`:
    at the metric's ceiling the dev loss decides); when not, a warning says what to try.
    """
    cfg.validate()
    if not train or not dev:
        raise SparseZOError("training needs non-empty train and dev splits; raise --num-train/--num-dev")
    if dist is not None:
        check_one_process(cfg.lr_auto, cfg.zo.optimizer)
    fingerprint = model_fingerprint(model)  # base θ and model, recorded in checkpoints (refused on resume if changed)
    if resume and "zo" in resume.trajectory.meta:  # go on with the run's noise version (1: started before v2)
        cfg = replace(cfg, zo=replace(cfg.zo, noise=resume.trajectory.meta["zo"]["noise"]))
    fused = None
    if dist is None:
        fused = fused_engine(model, params, cfg)
        engine = ZOEngine(params, cfg.zo, cfg.steps, fused=fused)
    else:
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
    board = TensorBoardLog(tensorboard) if tensorboard else None

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

    def evaluate(step: int) -> tuple[float, float | None]:
        """(dev metric, dev loss or None) at ``step``; both rank 0's under ``dist``."""
        # its own bar (the step bar's rate must not absorb a dev pass, nor step 0's look like a hang)
        desc = f"dev @ step {step}" if progress else None
        res = evaluate_split(model, tokenizer, task, dev, cfg.eval_batch_size, desc=desc)
        if dist is not None:
            for k in ("value", "loss", "loss_se"):
                if k in res:
                    res[k] = dist.from_main(res[k], f"dev evaluation at step {step}")
        row = {"step": step, f"dev_{res['metric']}": res["value"]}
        if "loss" in res:
            row.update(dev_loss=res["loss"], dev_loss_se=res["loss_se"])
        if on_eval is not None:
            row.update(on_eval(step))
        log(row)
        return res["value"], res.get("loss")

    t0 = time.perf_counter()
    scale = weight_scale(params)
    check_eps(cfg.zo.eps, scale)
    drift = DriftGuard(params, scale)
    lr_probe = None
    if cfg.lr_auto and resume:
        lr_probe = next((r["lr_auto"] for r in history if "lr_auto" in r), None)
        if lr_probe is None:
            raise SparseZOError("the checkpoint's history holds no --lr auto probe: the run was not started with "
                                "--lr auto; restore its config.json")
    elif cfg.lr_auto:
        lr_probe = probe_lr(model, tokenizer, params, encoded, dev, cfg, fused, progress)
        log({"step": 0, "lr_auto": lr_probe})
    zo = cfg.zo if lr_probe is None else replace(cfg.zo, lr=lr_probe["lr"])
    engine.cfg = zo  # the engine reads its lr from its config at every step
    if resume:
        params.theta.copy_(resume.theta)
        params.restore()
        for k, v in resume.opt_state.items():
            engine.opt.state[k].copy_(v)
        best_acc, best_step, best_theta = resume.best_value, resume.best_step, resume.best_theta.clone()
        best_loss = next((r.get("dev_loss") for r in history if r["step"] == best_step and "dev_loss" in r), None)
        trajectory, start, t0 = resume.trajectory, resume.step, t0 - resume.seconds
    else:
        (best_acc, best_loss), best_step, best_theta = evaluate(0), 0, params.theta.clone()
        trajectory, start = Trajectory(), 0
    key, row = start_row(history)
    ceiling = at_ceiling(row[key], len(dev))
    bar = tqdm(range(start, cfg.steps), desc="zo", unit="step", disable=not progress, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    running = None
    graphed = graphed_decoder(model, cfg, fused, encoded)
    try:
        for step in bar:
            idx = batch_indices(cfg.zo.seed, step, len(encoded), cfg.batch_size)
            idx = idx if dist is None else dist.shard(idx)
            b = micro_batches([encoded[i] for i in idx], pad, device, cfg.bucket)
            loss = PMLoss(model, b, cfg.loss, forward=graphed)
            rec: StepRecord = engine.step(step, loss) if dist is None else engine.step(step, loss, len(idx))
            trajectory.append(rec)
            running = rec.loss if running is None else 0.95 * running + 0.05 * rec.loss
            log({"step": step + 1, "loss": rec.loss, "grad": rec.grads, "seed": rec.seeds, "lr": rec.lr,
                 **({"curv": rec.curvs} if rec.curvs is not None else {})})
            evaluating = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
            drift.check(params.theta, step + 1, rec.lr, force=evaluating)
            if evaluating:
                acc, loss = evaluate(step + 1)
                bar.unpause()  # the step rate and ETA count ZO steps only, not the dev pass just shown
                if better(acc, loss, best_acc, best_loss, ceiling) or not cfg.keep_best:
                    best_acc, best_loss, best_step, best_theta = acc, loss, step + 1, params.theta.clone()
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
    outcome = Outcome.of(history, best_step, best_acc, best_loss, len(dev))
    if not outcome.improved:
        _log.warning("warning: nothing was learned: %s", outcome.explain(history, zo.lr, probed=lr_probe is not None))
    elif outcome.ceiling:
        _log.info("dev %s was at its ceiling at step 0 (%.4f): step %d was selected on the dev loss (%.4f -> %.4f)",
                  outcome.key[4:], outcome.start, best_step, outcome.start_loss, best_loss)
    return TrainResult(best_step, best_acc, history, time.perf_counter() - t0, cfg.steps, trajectory,
                       outcome.start, outcome.noise, outcome.improved, lr_probe, zo, best_loss, outcome.ceiling)
