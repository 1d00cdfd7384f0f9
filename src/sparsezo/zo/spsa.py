"""The ZO step: MeZO's seed trick with two-sided SPSA, over a :class:`TrainableParams` set.

    for each query i:  z_i = noise(seed(t, i))
        weights ← cast(θ + ε z_i);  L+ = loss()
        weights ← cast(θ − ε z_i);  L− = loss()
        g_i = (L+ − L−) / 2ε                      # one scalar
    θ ← optimizer(θ, (1/q) Σ g_i d_i);  weights ← cast(θ)

``d_i`` is the direction the weights really moved in: with ``direction="applied"`` it is
(cast(θ+εz) − cast(θ−εz)) / 2ε, so rounding to bf16 cannot silently make the update follow a
different direction than the one the loss difference measured (a 10-20% error at ε=1e-3 in
bf16). ``direction="sampled"`` uses z itself (MeZO's behaviour; right for fp32 weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..errors import SparseZOError
from .arith import ops_for
from .noise import NOISE_VERSION, NOISE_VERSIONS, sample, step_seed
from .registry import OPTIMIZERS
from .schedule import lr_at
from .trainable import TrainableParams

DISTRIBUTIONS = ("gaussian", "rademacher")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeders accept 0 .. 2**32-1 everywhere the run seed goes
DIRECTIONS = ("applied", "sampled")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class ZOConfig:
    """Hyper-parameters of the ZO optimiser (MeZO's names where they exist)."""

    lr: float = 1e-4
    eps: float = 1e-2
    q: int = 1
    dist: str = "gaussian"
    direction: str = "applied"
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "constant"
    warmup: int = 0
    seed: int = 0
    # the noise generator and update arithmetic (zo/noise.py, zo/arith.py): 2 is the same on every
    # device; trajectories written before it existed load as 1 and replay with the legacy ones
    noise: int = NOISE_VERSION

    def validate(self) -> None:
        """Every setting in its range, finite where it is a float (inf/nan pass a ``> 0`` test or slip through)."""
        finite = all(math.isfinite(v) for v in (self.lr, self.eps, self.weight_decay, self.beta1, self.beta2))
        checks = [
            (finite, f"--lr, --eps and --weight-decay must be finite numbers, got {self.lr}, {self.eps}, "
                     f"{self.weight_decay}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.eps > 0, f"--eps must be > 0, got {self.eps}"),
            (self.q >= 1, f"--q must be >= 1, got {self.q}"),
            (self.warmup >= 0, f"--warmup must be >= 0 steps, got {self.warmup}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0 .. {MAX_SEED}, got {self.seed}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}"),
            (self.dist in DISTRIBUTIONS, f"--dist must be one of {DISTRIBUTIONS}, got {self.dist!r}"),
            (self.direction in DIRECTIONS, f"--direction must be one of {DIRECTIONS}, got {self.direction!r}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.noise in NOISE_VERSIONS, f"noise version must be one of {NOISE_VERSIONS}, got {self.noise!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SparseZOError(msg)
        need = OPTIMIZERS[self.optimizer].min_queries
        if self.q < need:
            raise SparseZOError(f"--optimizer {self.optimizer} needs --q >= {need} queries a step, got {self.q}; "
                                "use --q 8")


@dataclass
class StepRecord:
    """Everything needed to replay a step: its seeds, projected gradients and learning rate.

    ``curvs`` (per query, (L+ + L− − 2·L(θ))/ε²) only for optimisers that use curvature (hizoo).
    """

    step: int
    seeds: list[int]
    grads: list[float]
    lr: float
    loss: float
    curvs: list[float] | None = None


def all_finite(x: torch.Tensor) -> bool:
    """``torch.isfinite(x).all()`` at the cost of one sum (a tenth of it on CPU): a non-finite
    entry makes the sum non-finite; a finite set whose sum overflows takes the exact test."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class ZOEngine:
    """Runs ZO steps on a trainable set; holds the optimiser state."""

    def __init__(self, params: TrainableParams, cfg: ZOConfig, total_steps: int, cache_bytes: int = 1 << 30,
                 fused=None):
        cfg.validate()
        self.params, self.cfg, self.total_steps = params, cfg, total_steps
        # a FusedPM (zo/fused.py): L+ and L− from one stacked forward when the loss offers ``pair()``
        self.fused = fused
        self.ops = ops_for(cfg.noise)
        self.opt = OPTIMIZERS[cfg.optimizer](
            params.numel, params.theta.device, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
            ops=self.ops,
        )
        # Within a step z is needed three times (+ε, −ε, update). Keeping it costs 4 bytes per
        # entry and query; below ``cache_bytes`` that is cheaper than generating it again
        # (full ZO on CPU spends most of its overhead in the generator). Same values either way.
        self.cache_z = 4 * params.numel * cfg.q <= cache_bytes
        self._z: dict[tuple[int, int], torch.Tensor] = {}
        # the applied direction of a measured query, which then replaces its z (same size)
        self._d: dict[tuple[int, int], torch.Tensor] = {}

    def noise(self, seed: int, s: int, e: int) -> torch.Tensor:
        """z[s:e] of ``seed``: from this step's cache, else generated (and cached if allowed)."""
        z = self._z.get((seed, s))
        if z is None:
            z = sample(seed, s, e, self.cfg.dist, self.params.theta.device, self.cfg.noise)
            if self.cache_z:
                self._z[(seed, s)] = z
        return z

    def _forget(self) -> None:
        """Drop this step's cached z and directions."""
        self._z.clear()
        self._d.clear()

    def _perturb(self, seed: int, scale: float, measure: bool = False) -> None:
        """Weights ← cast(θ + scale·z).

        ``measure`` (the −ε phase of a two-sided query, the weights holding cast(θ + εz)) also
        keeps the applied direction, read from the weights before they are overwritten, in place of
        z when z is cached: the update then needs neither z nor two more casts of θ ± εz, which
        made up a third of a full-ZO step's overhead on CPU. The values are those ``direction``
        computes (θ + (−ε)z is θ − εz exactly), so θ does not change by a bit.
        """
        keep = measure and self.cache_z and self.cfg.direction == "applied"
        for s, e in self.params.blocks():
            v = self.params.theta[s:e] + scale * self.noise(seed, s, e)
            if keep:
                v = v.to(self.params.dtype)
                self._d[(seed, s)] = self.ops.div(self.params.read(s, e).float() - v.float(), 2 * self.cfg.eps)
                del self._z[(seed, s)]
            self.params.write(v, s)

    def perturbed_losses(self, seed: int, loss_fn: Callable[[], float]) -> tuple[float, float]:
        """L(θ+εz) and L(θ−εz); the weights are left perturbed (call ``params.restore``).

        With a fused engine that serves this loss (it has ``pair()``, its batch is small enough),
        both come from one forward over the stacked batch, the weights untouched (see zo/fused.py);
        the same cast values are applied.
        """
        if self.fused is not None and self.fused.serves(loss_fn):
            eps, theta = self.cfg.eps, self.params.theta
            z = torch.cat([self.noise(seed, s, e) for s, e in self.params.blocks()])
            return self.fused.losses((theta + eps * z).to(self.params.dtype), (theta - eps * z).to(self.params.dtype),
                                     loss_fn.pair)
        self._perturb(seed, self.cfg.eps)
        lp = loss_fn()
        self._perturb(seed, -self.cfg.eps, measure=True)
        lm = loss_fn()
        return lp, lm

    def projected_gradient(self, seed: int, loss_fn: Callable[[], float]) -> float:
        """g = (L(θ+εz) − L(θ−εz)) / 2ε at the current θ, the weights left as they were (nothing updated)."""
        lp, lm = self.perturbed_losses(seed, loss_fn)
        self._forget()
        self.params.restore()
        return (lp - lm) / (2 * self.cfg.eps)

    def direction(self, seed: int, s: int, e: int) -> torch.Tensor:
        """The update direction of θ[s:e] for ``seed`` (see the module docstring)."""
        if (d := self._d.get((seed, s))) is not None:
            return d
        z = self.noise(seed, s, e)
        if self.cfg.direction == "sampled":
            return z
        theta, eps = self.params.theta[s:e], self.cfg.eps
        if self.opt.one_sided:  # the loss difference was measured between cast(θ+εz) and cast(θ)
            return self.ops.div(self.params.rounded(theta + eps * z) - self.params.rounded(theta), eps)
        return self.ops.div(self.params.rounded(theta + eps * z) - self.params.rounded(theta - eps * z), 2 * eps)

    def apply(self, step: int, seeds: list[int], grads: list[float], lr: float,
              curvs: list[float] | None = None) -> None:
        """θ ← optimizer(θ, mean_i g_i d_i), then write θ into the weights. Used by replay too.

        ``curvs`` (optimisers with ``needs_center``) also give the optimiser mean_i |c_i| d_i²,
        built from the same directions in the same pass.

        Raises :class:`SparseZOError` when θ leaves the finite floats: a bounded loss (``acc``)
        stays finite while θ overflows, so the loss check alone would let a NaN delta be saved.
        θ is then unusable; the caller stops (training keeps its last checkpoint). The check runs
        once over the whole θ after the update: one host synchronisation a step, not one per block.
        """
        q = len(seeds)
        grads = self.opt.normalise(grads)
        for s, e in self.params.blocks():
            grad = torch.mul(self.direction(seeds[0], s, e), grads[0] / q)  # = 0 + the first term, one pass less
            for seed, g in zip(seeds[1:], grads[1:]):
                self.ops.axpy_(grad, self.direction(seed, s, e), g / q)
            if curvs is None:
                self.opt.update_(self.params.theta[s:e], grad, s, e, lr, step)
            else:
                curv = torch.zeros_like(grad)
                for seed, c in zip(seeds, curvs):
                    d = self.direction(seed, s, e)  # cached within the step: no second generation
                    self.ops.sq_axpy_(curv, d, abs(c) / q)
                self.opt.update_(self.params.theta[s:e], grad, s, e, lr, step, curv=curv,
                                 curv_scale=sum(abs(c) for c in curvs) / q)
        self._forget()
        if not all_finite(self.params.theta):
            raise SparseZOError(f"the trainable weights became NaN or infinite at step {step} (lr {lr:g}, projected "
                                f"gradient(s) {', '.join(f'{g:.3g}' for g in grads)}): the update diverged; lower --lr")
        self.params.restore()

    def step(self, step: int, loss_fn: Callable[[], float]) -> StepRecord:
        """One ZO step at 0-based ``step``; raises on a non-finite loss, leaving θ untouched."""
        seeds, lps, lms = [], [], []
        # L(θ) for curvature (hizoo) or one-sided slopes (fzoo): the weights hold cast(θ) here,
        # restored after the last update
        l0 = loss_fn() if self.opt.needs_center else None
        for i in range(self.cfg.q):
            seed = step_seed(self.cfg.seed, step, i)
            if self.opt.one_sided:
                self._perturb(seed, self.cfg.eps)
                lp, lm = loss_fn(), l0
            else:
                lp, lm = self.perturbed_losses(seed, loss_fn)
            seeds.append(seed), lps.append(lp), lms.append(lm)
            if not (math.isfinite(lp) and math.isfinite(lm)):
                break  # no point measuring the other queries
        return self.finish(step, seeds, lps, lms, l0)

    def finish(self, step: int, seeds: list[int], lps: list[float], lms: list[float],
               l0: float | None = None) -> StepRecord:
        """Turn the measured L± of each query (and L(θ), ``l0``, if measured) into projected
        gradients (and curvatures) and apply the update. One-sided rules pass L(θ) as L−.

        Shared with query-parallel training, which measures the queries on several processes.
        """
        for lp, lm in zip(lps, lms):
            if not (math.isfinite(lp) and math.isfinite(lm) and (l0 is None or math.isfinite(l0))):
                self._forget()
                self.params.restore()
                raise SparseZOError(
                    f"loss became non-finite at step {step} (L+={lp}, L-={lm}, L0={l0}); lower --lr or --eps "
                    "and retry"
                )
        span = self.cfg.eps if self.opt.one_sided else 2 * self.cfg.eps
        grads = [(lp - lm) / span for lp, lm in zip(lps, lms)]
        curvs = ([(lp + lm - 2 * l0) / self.cfg.eps**2 for lp, lm in zip(lps, lms)]
                 if self.opt.uses_curvature else None)
        if not all(math.isfinite(g) for g in grads + (curvs or [])):  # finite losses over a tiny eps can still overflow
            self._forget()
            self.params.restore()
            raise SparseZOError(f"the projected gradient overflowed at step {step} ({grads}); raise --eps")
        losses = [l0] if self.opt.one_sided else [0.5 * (lp + lm) for lp, lm in zip(lps, lms)]
        lr = lr_at(self.cfg.schedule, self.cfg.lr, step, self.total_steps, self.cfg.warmup)
        self.apply(step, seeds, grads, lr, curvs)
        return StepRecord(step, seeds, grads, lr, sum(losses) / len(losses), curvs)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
