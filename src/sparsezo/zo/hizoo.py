"""HiZOO-style ZO with a diagonal curvature preconditioner (Zhao et al., ICLR 2025), on the sparse θ.

A step measures L(θ) once more (three forwards per query-1 step instead of two), which gives,
per query, the curvature of the batch loss along the perturbation for free:

    c_i = (L+ + L− − 2·L0) / ε²          ≈ z_iᵀ H z_i   (exact for a quadratic)

and keeps an EMA of the diagonal estimate |c_i|·d_i² (d_i: the applied direction, as for the
gradient). The update divides the usual SPSA gradient by it:

    h ← β₂·h + (1 − β₂)·mean_i |c_i|·d_i²        (h₀ = mean_i |c_i|: HiZOO's Σ₀ = I, in loss units)
    θ ← θ − lr·(ĝ / max(h, δ) + wd·θ)

Why: ĝ and h both scale with the loss, so the step does not depend on the model's loss scale
(the reason a ZO-SGD lr tuned on one model family learns nothing on another), and for a
quadratic lr = 1 is the exact line-search step along z (g/zᵀHz): lr is a fraction of a
Newton step, so one grid (0.01 … 1) fits any model. Honest limit: with |θ| ~ 10⁵ entries
E[|c|·z_k²] = tr(H) + 2·H_kk is dominated by tr(H), so the per-entry part of h is weak and
what the preconditioner reliably contributes is that scalar curvature scale; HiZOO's Σ^{1/2}
perturbation is not used, so the ±εz forwards (fused or not) are those of every other optimiser.

Replay: the recorded c_i (trajectory field ``curvs``) rebuild h exactly, so replay needs no
forward pass; ``h`` is θ-sized optimiser state, saved in checkpoints like Adam's moments.
"""

from __future__ import annotations

import torch

from .arith import Ops
from .sgd import SGD

MIN_CURV = 1e-12  # δ: a flat direction (c = 0) must not divide by zero; far below any real curvature


class HiZOO(SGD):
    """ZO-SGD preconditioned by an EMA of the diagonal curvature measured with one extra forward."""

    state_names = ("curv",)
    needs_center = True  # the engine measures L(θ) each step ...
    uses_curvature = True  # ... and passes the curvature to update_
    lr_default_grid = (0.01, 0.03, 0.1, 0.3, 1.0)  # fractions of the line-search step; independent of |θ|
    grid_from_g2 = False  # ... and of E[g²]: the curvature already sets the step's scale

    def __init__(self, numel: int, device, weight_decay: float = 0.0, beta2: float = 0.999, ops: Ops | None = None,
                 **_: float):
        super().__init__(numel, device, weight_decay, ops)
        self.beta2 = beta2

    @classmethod
    def lr_grid(cls, numel: int, g2: float | None = None) -> tuple[float, ...]:
        return cls.lr_default_grid

    def update_(self, theta: torch.Tensor, grad: torch.Tensor, s: int, e: int, lr: float, t: int,
                curv: torch.Tensor | None = None, curv_scale: float | None = None) -> None:
        """``curv`` = mean_i |c_i|·d_i² over θ[s:e], ``curv_scale`` = mean_i |c_i| (see the module docstring)."""
        if curv is None or curv_scale is None:
            raise ValueError("HiZOO needs the step's curvature (the engine measures L(θ) for it)")
        h = self.state["curv"][s:e]
        if t == 0:  # a fresh run (replay, probe or training); a resumed one loads h from its checkpoint
            h.fill_(curv_scale)
        self.ops.axpy_(h.mul_(self.beta2), curv, 1 - self.beta2)
        d = grad / h.clamp_min(MIN_CURV)
        if self.wd:
            d = d + self.wd * theta
        theta.sub_(lr * d)
