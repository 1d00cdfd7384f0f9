"""ZO-Adam: Adam on the ZO gradient estimate."""

from __future__ import annotations

from .arith import Ops
from .sgd import SGD


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
