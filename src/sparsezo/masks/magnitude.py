"""``magnitude-small`` (Sparse MeZO) and ``magnitude-large``: entries ranked by |w|."""

import torch

from .base import MaskContext, select_top


def small(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    return select_top({n: -p.detach().float().abs() for n, p in ctx.params.items()}, density, ctx.scope)


def large(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    return select_top({n: p.detach().float().abs() for n, p in ctx.params.items()}, density, ctx.scope)
