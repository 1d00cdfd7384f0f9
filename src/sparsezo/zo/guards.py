"""Guards against settings that silently destroy the weights: a too-large ε and a diverging θ.

Both compare against the *scale of the trained tensors*: the RMS of every tensor the mask
touches, weighted by how many of its entries are trained. Why not the RMS of the trained
entries themselves: a magnitude mask (Sparse MeZO) selects the smallest weights, whose own RMS
can be 100× below their layer's, and a legitimate update moves them by more than that. The
layer's scale is what a perturbation or an update has to stay well below to leave the model a
model.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import SparseZOError
from .trainable import TrainableParams
from ..hints import setting

log = logging.getLogger("sparsezo")
EPS_MAX = 1.0  # --eps at or above the trained tensors' RMS replaces them by noise in θ ± εz
DRIFT_WARN = 10.0  # RMS(θ − θ₀) above this many times that RMS: the weights are being overwritten (warned once)
DRIFT_STOP = 1000.0  # ... above this many: θ is noise whatever the model (e.g. --lr 1e3), the run stops
CHUNK = 1 << 22  # entries summed at once (float64), so a full-ZO set needs no θ-sized temporary


def _sum_squares(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """Σ x² in float64 over chunks: |θ| ~ 1e37 squares to inf in fp32."""
    flat, total = t.reshape(-1), 0.0
    other = None if minus is None else minus.reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        d = flat[s : s + CHUNK].double()
        if other is not None:
            d = d - other[s : s + CHUNK].double()
        total += d.pow(2).sum().item()
    return total


def weight_scale(params: TrainableParams) -> float:
    """RMS of the tensors the mask touches, each weighted by its number of trained entries."""
    total = weight = 0
    for k, t in enumerate(params.storage):
        n = params.offsets[k + 1] - params.offsets[k]
        total += n * _sum_squares(t) / max(t.numel(), 1)
        weight += n
    return max(math.sqrt(total / max(weight, 1)), 1e-8)


def check_eps(eps: float, scale: float) -> None:
    """Refuse an ε that swamps the weights: the two perturbed losses would measure noise, not a slope."""
    if eps >= EPS_MAX * scale:
        raise SparseZOError(f"--eps {eps:g} is not small next to the weights it perturbs (their RMS is {scale:.3g}): "
                            f"θ ± ε·z would replace them by noise; use --eps below {EPS_MAX * scale:.3g} "
                            "(MeZO's 1e-3 is typical)")


class DriftGuard:
    """Warns when θ has moved far from where it started, and stops the run when it moved absurdly far.

    Two thresholds, because "far" depends on the model: a tiny randomly initialised model learns by
    moving its weights ~10× their RMS, a pretrained one is being overwritten well before that. So
    ``DRIFT_WARN`` times the layers' RMS warns once (the user may mean it), and ``DRIFT_STOP`` times
    stops the run: there θ is noise (e.g. --lr 1e3 drives |θ| to 1e3 while a bounded loss such as
    ``acc`` stays finite), and keeping it would write a delta that looks like a result. Stopping
    mirrors the non-finite guard: one error line, the last good checkpoint stays.

    Checked every ``every`` steps and at every dev evaluation (before a θ can become "best"), so a
    short run is checked too. θ₀ is kept in the compute dtype: it *is* the base weights, exactly, at
    half of θ's bytes for bf16.
    """

    def __init__(self, params: TrainableParams, scale: float, every: int = 10):
        self.theta0, self.scale, self.every = params.theta.to(params.dtype, copy=True), scale, every
        self.warned = False

    def drift(self, theta: torch.Tensor) -> float:
        """RMS(θ − θ₀)."""
        return math.sqrt(_sum_squares(theta, self.theta0) / max(theta.numel(), 1))

    def check(self, theta: torch.Tensor, step: int, lr: float, force: bool = False) -> None:
        if not force and step % self.every:
            return
        drift = self.drift(theta)  # NaN compares False below: the non-finite guard reports that case
        if drift > DRIFT_STOP * self.scale:
            raise SparseZOError(f"θ diverged at step {step}: the trained weights moved {drift:.3g} (RMS) from their "
                                f"start, {drift / self.scale:.3g}× their layers' RMS {self.scale:.3g}; lr {lr:g} is "
                                f"far too large for them: lower {setting('lr')} (or use {setting('lr_auto')})")
        if drift > DRIFT_WARN * self.scale and not self.warned:
            self.warned = True
            log.warning("warning: after %d steps the trained weights moved %.3g (RMS) from their start, %.3gx their "
                        "layers' RMS %.3g: lr %g is implausibly large for them; the fine-tune is likely destroying "
                        "the model, lower %s", step, drift, drift / self.scale, self.scale, lr, setting("lr"))
