"""The ZO optimisers by name: adding one is one new file (a subclass of :class:`SGD`) plus one entry here."""

from __future__ import annotations

from .adam import Adam
from .fzoo import FZOO
from .hizoo import HiZOO
from .momentum import Momentum
from .sgd import SGD
from .sign import SignSGD

OPTIMIZERS: dict[str, type[SGD]] = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "sign": SignSGD, "hizoo": HiZOO,
                                    "fzoo": FZOO}


def forwards_per_step(optimizer: str, q: int) -> int:
    """Forward passes over a training batch per step: 2 per query (1 for one-sided rules), plus L(θ)
    for the rules that measure it.

    A fused ±ε forward (--fused-pm) runs the 2q as q forwards over a doubled batch: the same rows.
    """
    opt = OPTIMIZERS[optimizer]
    return (1 if opt.one_sided else 2) * q + int(opt.needs_center)


def state_vectors(optimizer: str) -> int:
    """θ-sized float32 vectors of optimiser state a checkpoint holds (momentum, Adam moments, curvature)."""
    return len(OPTIMIZERS[optimizer].state_names)
