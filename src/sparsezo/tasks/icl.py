"""In-context learning baselines: prepend k solved training examples to every prompt.

MeZO's ICL baseline uses one fixed set of demonstrations per seed for the whole test set, so
the comparison with fine-tuning is not muddied by per-example prompt variance. A demonstration
is its prompt followed by its gold completion (the first gold answer for generation tasks).
An evaluated example never sees itself: if it is one of the drawn demonstrations (same prompt),
the next one in the seeded order replaces it, for that example only.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import numpy as np

from ..errors import SparseZOError
from .base import Example


def with_demonstrations(examples: list[Example], pool: list[Example], k: int, seed: int,
                        separator: str = "\n\n") -> list[Example]:
    """Copies of ``examples`` whose prompts start with ``k`` seeded demonstrations from ``pool``."""
    if k < 0:
        raise SparseZOError(f"--icl must be >= 0, got {k}")
    if k == 0:
        return list(examples)
    perm = np.random.default_rng(seed).permutation(len(pool))
    out = []
    for ex in examples:
        demos = list(islice((pool[int(i)] for i in perm if pool[int(i)].prompt != ex.prompt), k))
        if len(demos) < k:
            raise SparseZOError(f"--icl {k} needs {k} training examples other than the evaluated one, the pool has "
                                f"{len(pool)}; lower --icl or raise --num-train")
        context = separator.join(d.prompt + d.candidates[d.gold] for d in demos)
        out.append(replace(ex, prompt=context + separator + ex.prompt))
    return out
