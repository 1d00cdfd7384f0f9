"""``random``: a seeded uniform sample of exactly round(density × N) eligible entries."""

import numpy as np
import torch

from .base import MaskContext, exact_count


def compute(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    sizes = [p.numel() for p in ctx.params.values()]
    rng = np.random.default_rng(ctx.seed)
    if ctx.scope == "per-tensor":
        counts = [exact_count(density, n) for n in sizes]
    else:  # global: how many of the k picks land in each tensor follows the hypergeometric law
        counts = rng.multivariate_hypergeometric(sizes, exact_count(density, sum(sizes))).tolist()
    out = {}
    for i, (name, n, k) in enumerate(zip(ctx.params, sizes, counts)):
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + i)
        out[name] = torch.randperm(n, generator=g)[:k].sort().values
    return out
