"""``random``: a seeded uniform sample of exactly round(density × N) eligible entries.

Global scope samples k distinct flat positions of the concatenated eligible tensors at once
(so how many land in each tensor follows the multivariate hypergeometric law by construction)
and splits them by tensor; numpy's sampler without replacement costs O(k), not O(N), which
keeps a 7B model (6.5e9 entries, beyond numpy's hypergeometric limit of 1e9) at seconds
instead of a full permutation per tensor.
"""

import numpy as np
import torch

from .base import MaskContext, exact_count


def compute(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    sizes = [p.numel() for p in ctx.params.values()]
    if ctx.scope == "per-tensor":
        return {name: _sample(np.random.default_rng([ctx.seed, i]), n, exact_count(density, n))
                for i, (name, n) in enumerate(zip(ctx.params, sizes))}
    flat = _sample(np.random.default_rng(ctx.seed), sum(sizes), exact_count(density, sum(sizes)))
    offsets = np.cumsum([0] + sizes)
    bounds = np.searchsorted(flat.numpy(), offsets)
    return {name: flat[bounds[i]:bounds[i + 1]] - int(offsets[i]) for i, name in enumerate(ctx.params)}


def _sample(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """k distinct sorted integers of [0, n), uniformly."""
    return torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
