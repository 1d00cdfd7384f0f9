"""``--lr auto``: probe a grid of lrs for a few steps each and choose one, before the run trains."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from ..errors import SparseZOError
from ..eval.scoring import encode, micro_batch_loss, micro_batches
from ..hints import setting
from ..tasks import Example
from ..zo import TrainableParams, ZOEngine, sgd
from ..zo.fused import FusedPM, PMLoss
from ..zo.noise import step_seed
from ..zo.registry import OPTIMIZERS, forwards_per_step
from .batches import batch_indices
from .config import TrainConfig

_log = logging.getLogger("sparsezo")
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
    return {"backoff": PROBE_BACKOFF, "g2_queries": PROBE_G2_QUERIES, "ref_g2": sgd.REF_G2,
            "no_signal": PROBE_NO_SIGNAL}


def probe_lr(model, tokenizer, params: TrainableParams, encoded: list, dev: list[Example], cfg: TrainConfig,
             fused: FusedPM | None = None, progress: bool = True) -> dict[str, Any]:
    """``--lr auto``: a few ZO steps from θ₀ per candidate lr; train with the one with the lowest
    dev loss divided by PROBE_BACKOFF (see there why), or, when none lowered it or the run is too
    short to try them, the grid's centre (:func:`grid_centre`).

    The candidates of sgd and momentum are centred on E[g²] measured first at θ₀
    (``projected_g2``, 2·PROBE_G2_QUERIES forwards, fewer where the cap needs it): their best lr
    moves with it by decades between masks and models, which no fixed or |θ|-scaled grid of five points covers.

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
    n_grid = len(cfg.lr_grid or opt.lr_grid(params.numel))  # its length does not depend on g²
    fps = forwards_per_step(cfg.zo.optimizer, cfg.zo.q)
    run_forwards = cfg.steps * fps
    cap = int(PROBE_SHARE * run_forwards)
    # E[g²] takes 2 forwards a query: as many queries as the cap allows, up to PROBE_G2_QUERIES, and none
    # below 2 (a short run's grid is then centred on |θ|): the probe never costs more than PROBE_SHARE
    g2_queries = min(PROBE_G2_QUERIES, cap // 2) if cfg.lr_grid is None and opt.grid_from_g2 else 0
    g2_queries = g2_queries if g2_queries >= 2 else 0
    g2_forwards = 2 * g2_queries
    sub = dev[:PROBE_DEV]
    # one dev-loss measurement in the unit the run's forwards are counted in (a forward over a training
    # batch: both are split into length-bucketed micro-batches alike), i.e. dev examples / batch size
    eval_cost = -(-len(sub) // cfg.batch_size)
    steps_each = min(PROBE_MAX_STEPS, (cap - g2_forwards - eval_cost * (n_grid + 1)) // (n_grid * fps))
    g2 = projected_g2(model, tokenizer, params, encoded, cfg, fused, g2_queries) if g2_queries else None
    if g2 is not None and not g2 > 0:
        _log.warning("warning: %s: the loss did not change along any of %d perturbations at θ₀ (mean g² = "
                     "%s): the trainable weights barely affect it; centring the grid on |θ| instead (raise %s "
                     "or use another mask)", setting("lr_auto"), g2_queries, g2, setting("eps"))
    grid = list(cfg.lr_grid or opt.lr_grid(params.numel, g2))
    report = {"candidates": grid, "g2": g2, "g2_queries": g2_queries, "backoff": PROBE_BACKOFF,
              "dev_examples": len(sub), "cap_forwards": cap,
              "run_forwards": run_forwards}
    if steps_each < 2:  # too short a run to try every candidate twice within the cap: the grid's centre
        chosen = grid_centre(grid, [])
        _log.info("--lr auto: %d steps are too few to try %d lrs within %.0f%% of the run's forwards; using the grid's "
                  "centre, lr %g (mean g² at θ₀ %s; %d forwards)", cfg.steps, len(grid), 100 * PROBE_SHARE, chosen,
                  g2, g2_forwards)
        return {"lr": chosen, "choice": "short-run", "probe_best_lr": None, "dev_loss": [], "start_dev_loss": None,
                "steps_each": 0, "forwards": g2_forwards, **report}
    device = params.theta.device
    batches = micro_batches(encode(tokenizer, sub), tokenizer.pad_token_id, device, cfg.bucket)

    def dev_loss() -> float | None:
        value = micro_batch_loss(model, batches, cfg.loss)
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
                    engine.step(t, PMLoss(model, micro_batches([encoded[i] for i in idx], tokenizer.pad_token_id,
                                                               device, cfg.bucket), cfg.loss))
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
        _log.warning("warning: %s: no candidate lr of %s lowered the dev loss in %d steps (%.4f at the "
                     "start), so the probe could not choose; using the grid's centre, lr %g. If the dev value "
                     "stays flat, the task may need more %s, another %s or a %s of your own",
                     setting("lr_auto"), grid, steps_each, start, chosen, setting("steps"), setting("loss"),
                     setting("lr"))
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
                 fused: FusedPM | None = None, queries: int = PROBE_G2_QUERIES) -> float:
    """E[g²]: the mean squared projected gradient ((L+ − L−)/2ε)² at θ₀ over ``queries`` queries,
    on the run's own first batches and noise seeds (2 forwards each; θ is not changed).

    It is what the ZO step sees of the gradient on the trained set, whatever the model family,
    mask, loss scale or dtype, so the lr grid can be centred on it (``SGD.lr_grid``).
    """
    engine = ZOEngine(params, cfg.zo, cfg.steps, fused=fused)
    total = 0.0
    for t in range(queries):
        idx = batch_indices(cfg.zo.seed, t, len(encoded), cfg.batch_size)
        batch = micro_batches([encoded[i] for i in idx], tokenizer.pad_token_id, params.theta.device, cfg.bucket)
        g = engine.projected_gradient(step_seed(cfg.zo.seed, t), PMLoss(model, batch, cfg.loss))
        if not math.isfinite(g):
            raise SparseZOError(f"--lr auto: the loss is not finite at θ₀ ±ε·z (g = {g}); lower --eps")
        total += g * g
    return total / queries
