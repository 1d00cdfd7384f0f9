"""ZO-SignSGD: the sign of the ZO gradient estimate."""

from __future__ import annotations

from .adam import Adam
from .sgd import SGD


class SignSGD(SGD):
    """ZO-SignSGD: only the sign of the estimate is used (robust to the scale of g)."""

    lr_grid = Adam.lr_grid  # every entry moves exactly lr a step, as Adam's normalised step
    grid_from_g2 = False

    def direction(self, theta, grad, s, e, t):
        return grad.sign()
