"""MeZO's reference step, kept only as a measured baseline for ``sparsezo bench --baseline mezo``.

As in MeZO's code: for every trainable tensor, reseed the global generator and draw
``randn_like`` again in each of four passes (+ε, −2ε, +ε, update), adding in place to the
weights in their own dtype (no fp32 master). With a sparse mask the same loop touches only the
masked entries of each tensor — the "naive sparse" version, one Python call per tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .trainable import TrainableParams


class MeZOReference:
    def __init__(self, params: TrainableParams, eps: float, lr: float):
        self.targets = list(zip(params.storage, params.indices))
        self.eps, self.lr = eps, lr

    @torch.no_grad()
    def _pass(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for t, idx in self.targets:
            if idx is None:
                t.add_(torch.randn_like(t), alpha=scale)
            else:
                flat = t.view(-1)
                z = torch.randn(idx.numel(), dtype=t.dtype, device=t.device)
                flat.index_put_((idx,), flat[idx] + scale * z)

    def step(self, seed: int, loss_fn: Callable[[], float]) -> float:
        self._pass(seed, self.eps)
        lp = loss_fn()
        self._pass(seed, -2 * self.eps)
        lm = loss_fn()
        self._pass(seed, self.eps)
        g = (lp - lm) / (2 * self.eps)
        self._pass(seed, -self.lr * g)
        return g
