"""Heavy-ball momentum on the ZO gradient estimate."""

from __future__ import annotations

from .arith import Ops
from .sgd import SGD


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
