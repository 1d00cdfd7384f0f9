"""Looking at masks: where the trainable weights sit, how two masks overlap, Fisher mass.

SensZOQ's two empirical claims are checked with these: the top 0.1% of Fisher scores hold a
large share (~50%) of the total mass, and masks from different data overlap (transfer).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import SparseZOError
from ..io import atomic_path
from .base import Mask, numel
from .topk import TopK

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """Short module kind of a parameter name, e.g. ``q_proj`` for ``...self_attn.q_proj.weight``."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def _count(mask: Mask, name: str) -> int:
    idx = mask.indices[name]
    return numel(mask.shapes[name]) if idx is None else idx.numel()


def density_table(mask: Mask) -> dict[str, dict]:
    """Trainable/total counts per layer and per module kind."""
    by_layer: dict = defaultdict(lambda: [0, 0])
    by_module: dict = defaultdict(lambda: [0, 0])
    for name in mask.indices:
        k, n = _count(mask, name), numel(mask.shapes[name])
        for table, key in ((by_layer, layer_of(name)), (by_module, module_of(name))):
            table[key][0] += k
            table[key][1] += n
    fmt = lambda t: {str(k): {"trainable": a, "numel": b, "density": a / b} for k, (a, b) in t.items()}  # noqa: E731
    return {"layers": fmt(by_layer), "modules": fmt(by_module)}


def _as_set(mask: Mask, name: str) -> np.ndarray:
    idx = mask.indices[name]
    return np.arange(numel(mask.shapes[name])) if idx is None else idx.numpy()


def compare(a: Mask, b: Mask) -> dict:
    """Jaccard overlap |A∩B| / |A∪B|, overall, per layer and per module kind."""
    if a.shapes != b.shapes:
        diff = sorted(set(a.shapes) ^ set(b.shapes)) or [n for n in a.shapes if a.shapes[n] != b.shapes.get(n)]
        raise SparseZOError(f"masks cover different tensors or shapes (e.g. {diff[:2]}); compare masks of the same model")
    inter_l: dict = defaultdict(int)
    union_l: dict = defaultdict(int)
    inter_m: dict = defaultdict(int)
    union_m: dict = defaultdict(int)
    for name in a.shapes:
        x, y = _as_set(a, name), _as_set(b, name)
        i = np.intersect1d(x, y, assume_unique=True).size
        u = x.size + y.size - i
        for inter, union, key in ((inter_l, union_l, layer_of(name)), (inter_m, union_m, module_of(name))):
            inter[key] += i
            union[key] += u
    jac = lambda i, u: i / u if u else 1.0  # noqa: E731
    return {
        "jaccard": jac(sum(inter_l.values()), sum(union_l.values())),
        "intersection": sum(inter_l.values()),
        "a": a.num_trainable, "b": b.num_trainable,
        "layers": {str(k): jac(inter_l[k], union_l[k]) for k in inter_l},
        "modules": {str(k): jac(inter_m[k], union_m[k]) for k in inter_m},
    }


DEFAULT_MASS_DENSITIES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def fisher_mass(scores: dict[str, torch.Tensor], densities=DEFAULT_MASS_DENSITIES) -> dict[str, float]:
    """Share of the total score held by the top ``d`` fraction of entries, for each density ``d``.

    Computed by the same streaming top-k as the ``sensitive`` rule, so ``mask compute`` and
    ``mask mass`` report identical figures for the same scores.
    """
    top = TopK({n: s.numel() for n, s in scores.items()}, min(densities), "global", tuple(densities), pool_limit=2**62)
    for name, s in scores.items():
        top.offer(name, s)
    return top.mass()


def plot_layer_density(mask: Mask, path: str | Path) -> None:
    """Bar chart of trainable share per decoder layer, stacked by module kind (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SparseZOError("plotting needs matplotlib: pip install 'sparsezo[plot]'") from e
    layers = sorted({layer_of(n) for n in mask.indices if layer_of(n) is not None})
    modules = sorted({module_of(n) for n in mask.indices})
    total = defaultdict(int)
    counts = {m: defaultdict(int) for m in modules}
    for name in mask.indices:
        layer = layer_of(name)
        total[layer] += numel(mask.shapes[name])
        counts[module_of(name)][layer] += _count(mask, name)
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 4))
    bottom = np.zeros(len(layers))
    for m in modules:
        vals = np.array([counts[m][layer] / total[layer] for layer in layers])
        ax.bar(layers, vals, bottom=bottom, label=m)
        bottom += vals
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("trainable fraction of the layer's eligible weights")
    ax.set_title(f"{mask.rule} mask, density {mask.meta.get('density')}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
