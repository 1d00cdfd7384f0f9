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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import Delta, TrainState, check_resumable, save_checkpoint
from .errors import SparseZOError, os_hint
from .io import write_json, write_text
from .evaluate import evaluate as evaluate_split
from .quant import QUANT_LAYERS
from .scoring import LOSSES, batch_loss, encode, make_batch
from .tasks import Example, Task
from .zo import OPTIMIZERS, StepRecord, TrainableParams, Trajectory, ZOConfig, ZOEngine
from .zo.fused import FusedPM, PMLoss
from .zo.guards import DriftGuard, check_eps, weight_scale
from .zo.noise import step_seed
from .zo import optim
from .zo.optim import forwards_per_step

if TYPE_CHECKING:
    from .distributed import DistContext

_log = logging.getLogger("sparsezo")
IMPROVED_SE = 2.0  # "improved" = best dev above the step-0 dev by more than this many standard errors
PROBE_SHARE = 0.1  # --lr auto spends at most this share of the run's training forwards
PROBE_MAX_STEPS = 32  # ... and at most this many steps per candidate ("a few dozen")
PROBE_DEV = 32  # dev examples the probe scores (the first ones: the same for every candidate)
# The probe's best lr is divided by this. A few steps favour the largest stable lr (the first steps
# cut the loss fastest along an easy direction, the noise a large lr adds shows over hundreds of
# steps): on SmolLM2/SST-2 the probe's best, 1e-3, learned nothing in 400 steps (dev 0.55) where
# 1e-4 reached 0.745 (benchmarks/convergence.py). Ten is the LR range test's usual back-off.
PROBE_BACKOFF = 10.0
PROBE_G2_QUERIES = 8  # ± queries at θ₀ whose mean g² centres the grid of rules with grid_from_g2 (sgd, momentum)


# What --lr auto takes when its probe cannot choose — no candidate lowered the dev loss, or the run is too short
# to try them within PROBE_SHARE: the grid's log-centre, which for the built-in grids is the rule's own
# prediction (lr_ref · REF_G2 / E[g²] for sgd). The rule before, "the candidate that raised the loss least,
# ÷ PROBE_BACKOFF", almost always took the smallest lr (a tiny step changes the loss least), so it chose
# centre / 100 and guaranteed that nothing was learned (COPA 8.5e-7, CB 2.35e-6).
PROBE_NO_SIGNAL = "grid-centre"


def probe_rule() -> dict[str, float | str]:
    """The constants ``--lr auto``'s choice depends on: a result probed under other ones is stale."""
    return {"backoff": PROBE_BACKOFF, "g2_queries": PROBE_G2_QUERIES, "ref_g2": optim.REF_G2,
            "no_signal": PROBE_NO_SIGNAL}


FUSED_PM = ("auto", "on", "off")
# --fused-pm auto fuses a step's two forwards on a 4-bit base when its batch holds at most this many
# token positions. Measured on the idle 2-core CPU (benchmarks/README.md), fused step / two forwards:
# 0.72-0.84 at 1 x 32 tokens (7B-architecture int4, SmolLM2 int4 and nf4), but 1.5 at 1 x 256, 1.1
# (7B) and 1.8-2.8 (SmolLM2) at 16 x 64-256, and no gain on bf16 (1.0 at 1 x 32, 2.4 at batch 16):
# a doubled forward is cheaper than two only while the base matmul is bound by reading or
# dequantizing the weights rather than by its rows.
FUSED_AUTO_TOKENS = 64


@dataclass
class TrainConfig:
    """The loop's own settings; the optimiser's are in :class:`ZOConfig`."""

    steps: int = 500
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 32
    loss: str = "ce"
    keep_best: bool = True  # MeZO: return the θ with the best dev accuracy, not the last one
    fused_pm: str = "auto"  # both perturbed forwards as one stacked forward (zo/fused.py): on, off, or auto
    zo: ZOConfig = field(default_factory=ZOConfig)
    lr_auto: bool = False  # probe lr_grid on a dev subset first (see probe_lr); zo.lr is then set to the choice
    lr_grid: tuple[float, ...] | None = None  # --lr auto's candidates (None: the optimiser's own grid)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Integral):
                raise SparseZOError(f"--{name.replace('_', '-')} must be a whole number, got {getattr(self, name)!r}")
            if getattr(self, name) <= 0:
                raise SparseZOError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise SparseZOError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.lr_grid is not None and not (self.lr_grid and all(math.isfinite(v) and v > 0 for v in self.lr_grid)):
            raise SparseZOError(f"the --lr auto grid must hold finite lrs > 0, got {self.lr_grid}")
        self.zo.validate()
        if self.fused_pm not in FUSED_PM:
            raise SparseZOError(f"--fused-pm must be one of {', '.join(FUSED_PM)}, got {self.fused_pm!r}")
        if self.fused_pm == "on" and OPTIMIZERS[self.zo.optimizer].one_sided:
            raise SparseZOError(f"--fused-pm scores θ+εz and θ−εz together, but --optimizer {self.zo.optimizer} "
                                "measures one-sided L(θ+εz) − L(θ) (no ±ε pair to fuse); drop --fused-pm")


@dataclass
class TrainResult:
    best_step: int
    best_dev: float  # best dev value of the task metric (accuracy, or F1 for generation tasks)
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    trajectory: Trajectory
    start_dev: float  # the dev value at step 0 (the base model)
    dev_noise: float  # its standard error (see :func:`improvement`)
    improved: bool  # best_dev > start_dev + IMPROVED_SE · dev_noise
    lr_probe: dict[str, Any] | None  # --lr auto's report (candidates, dev losses, choice, forwards), or None


def improvement(start: float, best: float, best_step: int, n: int) -> tuple[float, bool]:
    """(standard error of the step-0 dev value, whether ``best`` beats it by more than IMPROVED_SE of them).

    The dev metric is a mean of ``n`` per-example scores in [0, 1] (accuracy, F1), whose
    variance is at most p(1 − p) — the binomial one for accuracy. p is the Agresti–Coull-style
    (x + 1)/(n + 2), so a step-0 value of 0 or 1 still has noise. Two standard errors, not one:
    the best of several noisy evaluations beats the first by about one on its own, with no
    learning at all. A run whose best is step 0 never improved.
    """
    p = (start * n + 1) / (n + 2)
    se = math.sqrt(p * (1 - p) / max(n, 1))
    return se, best_step > 0 and best - start > IMPROVED_SE * se


def _not_improved_hint(history: list[dict[str, Any]], key: str, start: float, se: float, lr: float) -> str:
    """What to try when nothing was learned: lower lr when the dev value fell, else either way.

    A flat dev curve is ambiguous: a too-small lr gives one, and so can a too-large one (lr 1e-3 kept
    SmolLM2's SST-2 dev within noise for 400 steps, where 1e-4 learned; benchmarks/convergence.py).
    """
    later = [r[key] for r in history if key in r and r["step"] > 0]
    fell = bool(later) and min(later) < start - IMPROVED_SE * se
    what = (f"the dev value fell below the base's: lr {lr:g} is too large, try --lr {lr / 3:.3g}" if fell else
            f"the dev value stayed within noise: try --lr {lr * 3:.3g} or more --steps (or --lr {lr / 3:.3g}: "
            "a too-large lr can also keep dev flat, its noise cancelling what it learns)")
    return f"{what}, or --lr auto to probe a grid of lrs first"


def probe_lr(model, tokenizer, params: TrainableParams, encoded: list, dev: list[Example], cfg: TrainConfig,
             fused: FusedPM | None = None, progress: bool = True) -> dict[str, Any]:
    """``--lr auto``: a few ZO steps from θ₀ per candidate lr; train with the one with the lowest
    dev loss divided by PROBE_BACKOFF (see there why), or, when none lowered it or the run is too
    short to try them, the grid's centre (:func:`grid_centre`).

    The candidates of sgd and momentum are centred on E[g²] measured first at θ₀
    (``projected_g2``, 2·PROBE_G2_QUERIES forwards): their best lr moves with it by decades
    between masks and models, which no fixed or |θ|-scaled grid of five points covers.

    Why the dev *loss* (cfg.loss over the first PROBE_DEV dev examples) and not accuracy: a few
    dozen steps move accuracy by less than its noise, the loss moves measurably. Every candidate
    runs the run's own first steps (same batches, same noise seeds: common random numbers, so
    the candidates differ only in lr), from the same θ₀, which is restored afterwards. A
    candidate that diverges (non-finite loss or θ) scores None. The cost, counted in forwards
    over a training batch (ZO forwards + dev examples / batch size), is capped at PROBE_SHARE
    of the run's ZO forwards; the steps per candidate are what fits, at most PROBE_MAX_STEPS (a run
    that fits fewer than 2 measures only E[g²]).
    """
    opt = OPTIMIZERS[cfg.zo.optimizer]
    g2_forwards = 2 * PROBE_G2_QUERIES if cfg.lr_grid is None and opt.grid_from_g2 else 0
    n_grid = len(cfg.lr_grid or opt.lr_grid(params.numel))  # its length does not depend on g²
    fps = forwards_per_step(cfg.zo.optimizer, cfg.zo.q)
    run_forwards = cfg.steps * fps
    cap = int(PROBE_SHARE * run_forwards)
    sub = dev[:PROBE_DEV]
    chunks = [sub[i : i + cfg.batch_size] for i in range(0, len(sub), cfg.batch_size)]
    eval_cost = len(chunks)  # forwards of one dev-loss measurement
    steps_each = min(PROBE_MAX_STEPS, (cap - g2_forwards - eval_cost * (n_grid + 1)) // (n_grid * fps))
    device = params.theta.device
    g2 = projected_g2(model, tokenizer, params, encoded, cfg, fused) if g2_forwards else None
    if g2 is not None and not g2 > 0:
        _log.warning("warning: --lr auto: the loss did not change along any of %d perturbations at θ₀ (mean g² = "
                     "%s): the trainable weights barely affect it; centring the grid on |θ| instead (raise --eps "
                     "or use another mask)", PROBE_G2_QUERIES, g2)
    grid = list(cfg.lr_grid or opt.lr_grid(params.numel, g2))
    report = {"candidates": grid, "g2": g2, "backoff": PROBE_BACKOFF, "dev_examples": len(sub), "cap_forwards": cap,
              "run_forwards": run_forwards}
    if steps_each < 2:  # too short a run to try every candidate twice within the cap: the grid's centre
        chosen = grid_centre(grid, [])
        _log.info("--lr auto: %d steps are too few to try %d lrs within %.0f%% of the run's forwards; using the grid's "
                  "centre, lr %g (mean g² at θ₀ %s; %d forwards)", cfg.steps, len(grid), 100 * PROBE_SHARE, chosen,
                  g2, g2_forwards)
        return {"lr": chosen, "choice": "short-run", "probe_best_lr": None, "dev_loss": [], "start_dev_loss": None,
                "steps_each": 0, "forwards": g2_forwards, **report}
    batches = [(make_batch(encode(tokenizer, c), tokenizer.pad_token_id, device=device), len(c)) for c in chunks]

    def dev_loss() -> float | None:
        value = sum(batch_loss(model, b, cfg.loss) * n for b, n in batches) / len(sub)
        return value if math.isfinite(value) else None

    theta0 = params.theta.clone()
    start = dev_loss()
    losses: list[float | None] = []
    bar = tqdm(total=len(grid) * steps_each, desc="lr probe", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for lr in grid:
            engine = ZOEngine(params, replace(cfg.zo, lr=lr), cfg.steps, fused=fused)
            try:
                for t in range(steps_each):
                    idx = batch_indices(cfg.zo.seed, t, len(encoded), cfg.batch_size)
                    engine.step(t, PMLoss(model, make_batch([encoded[i] for i in idx], tokenizer.pad_token_id,
                                                            device=device), cfg.loss))
                    bar.update(1)
                losses.append(dev_loss())
            except SparseZOError:  # diverged: θ or a loss left the finite floats
                losses.append(None)
                bar.update(steps_each - t - 1)
            params.theta.copy_(theta0)
            params.restore()
    finally:
        bar.close()
    if all(v is None for v in losses):
        raise SparseZOError(f"--lr auto: every candidate lr {grid} diverged within {steps_each} steps; pass a smaller "
                            "--lr, or a larger --eps")
    chosen, best, no_signal = choose_lr(grid, losses, start)
    forwards = g2_forwards + len(grid) * steps_each * fps + (len(grid) + 1) * eval_cost
    if no_signal:
        _log.warning("warning: --lr auto: no candidate lr of %s lowered the dev loss in %d steps (%.4f at the "
                     "start), so the probe could not choose; using the grid's centre, lr %g. If the dev value "
                     "stays flat, the task may need more --steps, another --loss or a --lr of your own",
                     grid, steps_each, start, chosen)
    else:
        _log.info("--lr auto: lr %g = %g (lowest dev loss %.4f, start %s, of %s) / %g; %d forwards = %.1f%% of "
                  "the run's %d", chosen, grid[best], losses[best], start, grid, PROBE_BACKOFF, forwards,
                  100 * forwards / run_forwards, run_forwards)
    return {"lr": chosen, "choice": "no-signal" if no_signal else "lowest-loss", "probe_best_lr": grid[best],
            "dev_loss": losses, "start_dev_loss": start, "steps_each": steps_each, "forwards": forwards, **report}


def choose_lr(grid: list[float], losses: list[float | None], start: float | None) -> tuple[float, int, bool]:
    """(lr to train with, index of the candidate with the lowest dev loss, whether the probe saw no signal).

    The lowest-loss candidate ÷ PROBE_BACKOFF (ties: the smaller lr; a diverged candidate's loss is None).
    When none went below the start loss the probe says nothing about the lr, and the lowest one is
    merely the smallest step; then it is :func:`grid_centre`.
    """
    best_loss, best = min((v, k) for k, v in enumerate(losses) if v is not None)
    if start is not None and best_loss >= start:
        return grid_centre(grid, [lr for lr, v in zip(grid, losses) if v is None]), best, True
    return float(f"{grid[best] / PROBE_BACKOFF:.3g}"), best, False


def grid_centre(grid: list[float], diverged: list[float]) -> float:
    """The lr when the probe cannot choose (PROBE_NO_SIGNAL): the grid's geometric centre — the built-in
    grids are centred on the rule's predicted lr — held PROBE_BACKOFF below a candidate that diverged."""
    return float(f"{min([math.sqrt(min(grid) * max(grid))] + [d / PROBE_BACKOFF for d in diverged]):.3g}")


def projected_g2(model, tokenizer, params: TrainableParams, encoded: list, cfg: TrainConfig,
                 fused: FusedPM | None = None) -> float:
    """E[g²]: the mean squared projected gradient ((L+ − L−)/2ε)² at θ₀ over PROBE_G2_QUERIES
    queries, on the run's own first batches and noise seeds (2 forwards each; θ is not changed).

    It is what the ZO step sees of the gradient on the trained set, whatever the model family,
    mask, loss scale or dtype, so the lr grid can be centred on it (``SGD.lr_grid``).
    """
    engine = ZOEngine(params, cfg.zo, cfg.steps, fused=fused)
    total = 0.0
    for t in range(PROBE_G2_QUERIES):
        idx = batch_indices(cfg.zo.seed, t, len(encoded), cfg.batch_size)
        batch = make_batch([encoded[i] for i in idx], tokenizer.pad_token_id, device=params.theta.device)
        g = engine.projected_gradient(step_seed(cfg.zo.seed, t), PMLoss(model, batch, cfg.loss))
        if not math.isfinite(g):
            raise SparseZOError(f"--lr auto: the loss is not finite at θ₀ ±ε·z (g = {g}); lower --eps")
        total += g * g
    return total / PROBE_G2_QUERIES


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
    metrics row, so a resumed run reuses it instead of probing again) and ``cfg.zo.lr`` is set
    to it. The result says whether anything was learned (``improved``, see
    :func:`improvement`); when not, a warning says what to try.
    """
    from .models import model_fingerprint

    cfg.validate()
    if not train or not dev:
        raise SparseZOError("training needs non-empty train and dev splits; raise --num-train/--num-dev")
    if dist is not None and (cfg.lr_auto or OPTIMIZERS[cfg.zo.optimizer].needs_center):
        raise SparseZOError("--lr auto and --optimizer hizoo/fzoo run in one process only; probe or train with one "
                            "process, then pass its lr / use another optimizer with --nproc")
    fingerprint = model_fingerprint(model)  # base θ and model, recorded in checkpoints (refused on resume if changed)
    fused = None
    if dist is None:
        fused = fused_engine(model, params, cfg)
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
    if lr_probe is not None:
        cfg.zo.lr = lr_probe["lr"]  # the engine reads its lr from this config at every step
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
            log({"step": step + 1, "loss": rec.loss, "grad": rec.grads, "seed": rec.seeds, "lr": rec.lr,
                 **({"curv": rec.curvs} if rec.curvs is not None else {})})
            evaluating = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
            drift.check(params.theta, step + 1, rec.lr, force=evaluating)
            if evaluating:
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
    key, start_dev = next((k, v) for r in history if r["step"] == 0 for k, v in r.items() if k.startswith("dev_"))
    noise, improved = improvement(start_dev, best_acc, best_step, len(dev))
    if not improved:
        _log.warning("warning: nothing was learned: best dev %s %.4f at step %d vs %.4f at step 0 (noise ±%.4f over "
                     "%d dev examples): %s; %s", key[4:], best_acc, best_step, start_dev, noise, len(dev),
                     "the result is the base model" if best_step == 0 else "the gain is within noise",
                     _not_improved_hint(history, key, start_dev, noise, cfg.zo.lr))
    return TrainResult(best_step, best_acc, history, time.perf_counter() - t0, cfg.steps, trajectory, start_dev,
                       noise, improved, lr_probe)


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

