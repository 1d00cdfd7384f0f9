"""ZO-SGD, the base class of every ZO optimiser: given the estimated gradient of one θ block, update it in place.

Updates run block by block so full-ZO never holds a θ-sized gradient; per-entry state
(momentum, Adam moments) is θ-sized, which is cheap for sparse sets. One file per rule, one
entry in :mod:`sparsezo.zo.registry`.
"""

from __future__ import annotations

import math

import torch

from .arith import Ops

REF_NUMEL = 106_168  # SmolLM2-135M's sensitive 0.1% set, where lr 1e-4 was measured best for ZO-SGD (DESIGN §8)
# ... and its mean squared projected gradient E[g²] = E[((L+ − L−)/2ε)²] at θ₀ there (SST-2, ε 1e-2: 188 over
# 16 queries at batch 16, 166 at batch 8). The --lr auto centre of the rules that set ``grid_from_g2`` is
# lr_ref · REF_G2 / E[g²] (see SGD.lr_grid): 1e-4 on that set, as the |θ| rule it replaces gave there.
REF_G2 = 200.0
GRID_STEPS = (0.1, 0.3, 1.0, 3.0, 10.0)  # --lr auto's candidates: a half-decade log grid around a centre


class SGD:
    """ZO-SGD (MeZO): θ ← θ − lr·(ĝ + wd·θ)."""

    state_names: tuple[str, ...] = ()
    needs_center = False  # True: the engine also measures L(θ) each step (one more forward)
    uses_curvature = False  # True: update_ takes the curvature (L+ + L− − 2L(θ))/ε², recorded in trajectories
    one_sided = False  # True: only L(θ + εz) per query, g = (L+ − L(θ))/ε (needs_center)
    min_queries = 1
    lr_ref = 1e-4  # the centre of the --lr auto grid where E[g²] = REF_G2 (or |θ| = REF_NUMEL, unmeasured)
    grid_from_g2 = True  # --lr auto measures E[g²] at θ₀ and centres the grid on it

    @classmethod
    def lr_grid(cls, numel: int, g2: float | None = None) -> tuple[float, ...]:
        """Candidate lrs for ``--lr auto`` on ``numel`` trainable entries whose mean squared
        projected gradient at θ₀ is ``g2``.

        ZO-SGD's best lr follows 1/E[g²]: the step −lr·g·z lowers the loss by lr·g² and raises it
        by ~lr²·g²·zᵀHz/2, so the best lr is ~1/tr(H) on the trained set, and where H ≈ the
        Fisher (squared gradients) tr(H) tracks E[g²]. On SmolLM2/SST-2 the best lr of the
        Fisher 0.1% mask (1e-4, E[g²] ≈ 190), of all weights (≥ 1e-4; ≈ 500 over 6 queries) and
        of a random 0.1% mask (3e-2; ≈ 0.4-0.7) follow it within a factor of ~3 across three
        decades of g². The older rule, 1/|θ| (MeZO's 1e-6…1e-7 on all weights), put full ZO's
        grid three decades too low and a random mask's two too low; it stays only for a g² that
        is zero or not measured.
        """
        if cls.grid_from_g2 and g2 is not None and math.isfinite(g2) and g2 > 0:
            centre = cls.lr_ref * REF_G2 / g2
        else:
            centre = cls.lr_ref * REF_NUMEL / max(numel, 1)
        return tuple(float(f"{centre * k:.3g}") for k in GRID_STEPS)

    @staticmethod
    def normalise(grads: list[float]) -> list[float]:
        """The step's q projected gradients as the update uses them (rules that rescale them override this)."""
        return grads

    def __init__(self, numel: int, device, weight_decay: float = 0.0, ops: Ops | None = None, **_: float):
        """``ops``: the update arithmetic (zo/arith.py), that of the run's noise version."""
        self.wd = weight_decay
        self.ops = ops or Ops()
        self.state = {k: torch.zeros(numel, dtype=torch.float32, device=device) for k in self.state_names}

    def direction(self, theta: torch.Tensor, grad: torch.Tensor, s: int, e: int, t: int) -> torch.Tensor:
        return grad

    def update_(self, theta: torch.Tensor, grad: torch.Tensor, s: int, e: int, lr: float, t: int) -> None:
        """Update θ[s:e] (passed as ``theta``) with its gradient estimate at step ``t`` (0-based)."""
        d = self.direction(theta, grad, s, e, t)
        if self.wd:
            d = d + self.wd * theta
        theta.sub_(lr * d)
