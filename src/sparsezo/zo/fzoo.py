"""FZOO-style one-sided batched ZO with a loss-spread-normalised step (Dang et al., 2025), on the sparse θ.

A step measures L0 = L(θ) once and then q one-sided perturbations, sharing L0:

    g_i = (L(θ + ε z_i) − L0) / ε                 i = 1 … q     (q + 1 forwards, not 2q)
    θ ← θ − lr·( (1/q) Σ_i (g_i / σ) d_i + wd·θ )  σ = std_i(g_i)  (sample std over the q queries)

Why: two-sided SPSA pays two forwards per direction; sharing the centre pays (q+1)/q, so at q = 8
the same forwards buy 1.8× as many directions. The one-sided difference carries a bias
ε/2·zᵀHz in g, but E[(zᵀHz)·z] = 0 for a symmetric z, so the update stays unbiased and only
its variance grows (ε is small against the loss curvature at the default 1e-2). Dividing by
the spread σ of the q measured slopes — FZOO's normalisation — makes the step independent of
the model's loss scale (g and σ scale together): the per-entry step is ~lr/√q whatever the
family's or task's gradient size (on COPA, where ZO-SGD's SST-2 lr drove dev down, fzoo's did
not; benchmarks/convergence.py). Measured limit: at equal forwards it does not beat ZO-SGD on
SST-2 (one seed: best dev 0.69 vs 0.745 in 800 forwards) — its q slopes share one batch, so it
sees q/2 times fewer training batches per forward.

Replay: σ is a function of the recorded g_i, so :meth:`normalise` rebuilds the update from
the trajectory exactly like training does; no extra state, format 1 trajectories.
"""

from __future__ import annotations

import math

from ..errors import SparseZOError
from .sgd import SGD

MIN_SPREAD = 1e-12  # all q slopes equal (a flat batch): no direction is preferred, the step is 0


class FZOO(SGD):
    """ZO-SGD over q one-sided queries sharing L(θ), each slope divided by the slopes' spread."""

    needs_center = True  # the engine measures L(θ) each step
    one_sided = True  # ... and L(θ + εz_i) only: g_i = (L+ − L0)/ε
    min_queries = 2  # σ needs two slopes
    # per-entry step ~lr/√q. The --lr auto grid's centre at SGD's REF_NUMEL entries: on SmolLM2's
    # sensitive 0.1%, SST-2, 800 forwards, lr 1e-3 / 3e-3 / 1e-2 gave best dev 0.645 / 0.685 / 0.68
    # (benchmarks/convergence.py); scaled by 1/|θ| as ZO-SGD's (the noise grows with the dimension)
    lr_ref = 3e-3
    grid_from_g2 = False  # each slope is divided by the slopes' spread: not measured against E[g²]

    @staticmethod
    def normalise(grads: list[float]) -> list[float]:
        """g_i / σ with σ the sample standard deviation of the q slopes (0 when they are all equal)."""
        q = len(grads)
        if q < FZOO.min_queries:
            raise SparseZOError(f"optimizer fzoo needs --q >= {FZOO.min_queries} one-sided queries a step (its step "
                                f"is normalised by their spread), got {q}; use --q 8")
        mean = math.fsum(grads) / q
        sigma = math.sqrt(math.fsum((g - mean) ** 2 for g in grads) / (q - 1))
        return [0.0] * q if sigma < MIN_SPREAD else [g / sigma for g in grads]
