"""ZO optimizers over θ: given the estimated gradient of one θ block, update that block in place.

Updates run block by block so full-ZO never holds a θ-sized gradient; per-entry state
(momentum, Adam moments) is θ-sized, which is cheap for sparse sets. One class per rule,
one registry entry.
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


class Momentum(SGD):
    """Heavy-ball momentum on the ZO gradient estimate."""

    state_names = ("momentum",)
    lr_ref = 1e-5  # heavy-ball with β₁ = 0.9 moves 1/(1 − β₁) = 10× as far as SGD per lr

    def __init__(self, numel: int, device, weight_decay: float = 0.0, beta1: float = 0.9, ops: Ops | None = None,
                 **_: float):
        super().__init__(numel, device, weight_decay, ops)
        self.beta1 = beta1

    def direction(self, theta, grad, s, e, t):
        m = self.state["momentum"][s:e]
        m.mul_(self.beta1).add_(grad)
        return m


class Adam(SGD):
    """Adam on the ZO gradient estimate (ZO-Adam in ZO-Bench)."""

    state_names = ("exp_avg", "exp_avg_sq")
    fixed_grid = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)  # per-entry steps of ~lr whatever |θ|: no dimension scaling
    grid_from_g2 = False  # ... and whatever the gradient's scale

    @classmethod
    def lr_grid(cls, numel: int, g2: float | None = None) -> tuple[float, ...]:
        return cls.fixed_grid

    def __init__(self, numel: int, device, weight_decay: float = 0.0, beta1: float = 0.9,
                 beta2: float = 0.999, adam_eps: float = 1e-8, ops: Ops | None = None, **_: float):
        super().__init__(numel, device, weight_decay, ops)
        self.beta1, self.beta2, self.adam_eps = beta1, beta2, adam_eps

    def direction(self, theta, grad, s, e, t):
        m, v = self.state["exp_avg"][s:e], self.state["exp_avg_sq"][s:e]
        self.ops.axpy_(m.mul_(self.beta1), grad, 1 - self.beta1)
        self.ops.sq_axpy_(v.mul_(self.beta2), grad, 1 - self.beta2)
        m_hat = self.ops.div(m, 1 - self.beta1 ** (t + 1))
        v_hat = self.ops.div(v, 1 - self.beta2 ** (t + 1))
        return m_hat / (v_hat.sqrt() + self.adam_eps)


class SignSGD(SGD):
    """ZO-SignSGD: only the sign of the estimate is used (robust to the scale of g)."""

    lr_grid = Adam.lr_grid  # every entry moves exactly lr a step, as Adam's normalised step
    grid_from_g2 = False

    def direction(self, theta, grad, s, e, t):
        return grad.sign()


from .fzoo import FZOO  # noqa: E402  (these build on SGD above)
from .hizoo import HiZOO  # noqa: E402

OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "sign": SignSGD, "hizoo": HiZOO, "fzoo": FZOO}


def forwards_per_step(optimizer: str, q: int) -> int:
    """Forward passes over a training batch per step: 2 per query (1 for one-sided rules), plus L(θ)
    for the rules that measure it.

    A fused ±ε forward (--fused-pm) runs the 2q as q forwards over a doubled batch: the same rows.
    """
    opt = OPTIMIZERS[optimizer]
    return (1 if opt.one_sided else 2) * q + int(opt.needs_center)


def lr_at(schedule: str, lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate at 0-based ``step``: constant, linear decay, or cosine, after linear warm-up."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1.0 - frac)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")
