"""Which training examples a step sees: a function of (seed, step) only, so a resumed run sees the same."""

from __future__ import annotations

import numpy as np


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Examples of a step: consecutive slices of per-epoch seeded permutations (resumable by step)."""

    perms: dict[int, np.ndarray] = {}
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch = j // n
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][j % n]))
    return out
