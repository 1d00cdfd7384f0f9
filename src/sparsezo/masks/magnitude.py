"""``magnitude-small`` (Sparse MeZO) and ``magnitude-large``: entries ranked by |w|.

Scores are made one tensor at a time and offered to the streaming top-k, so a 7B model never
holds more than one tensor's fp32 magnitudes (the mask is the same as ranking all at once).
"""

import torch

from .base import MaskContext
from .topk import TopK


def _ranked(ctx: MaskContext, density: float, sign: float) -> dict[str, torch.Tensor]:
    top = TopK({n: p.numel() for n, p in ctx.params.items()}, density, ctx.scope)
    for name, p in ctx.params.items():
        top.offer(name, p.detach().float().abs().mul_(sign))
    return top.indices()


def small(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    return _ranked(ctx, density, -1.0)


def large(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    return _ranked(ctx, density, 1.0)
