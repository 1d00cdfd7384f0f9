"""Mask rules: which eligible weights are trainable. One file per rule, one entry here.

Every rule is ``compute(ctx, density) -> {tensor name: sorted flat indices | None}``;
:func:`compute_mask` wraps the result with provenance metadata into a :class:`Mask`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SparseZOError
from ..model.params import model_fingerprint
from . import full, magnitude, random, sensitive
from .base import Mask, MaskContext, exact_count, select_top
from .quantized import QuantWeight, check_quant_rule, eligible_tensors

RULES: dict[str, Callable[[MaskContext, float], dict]] = {
    "sensitive": sensitive.compute,
    "sensitive-task": sensitive.compute,  # same score, texts come from the task's training split
    "magnitude-small": magnitude.small,
    "magnitude-large": magnitude.large,
    "random": random.compute,
    "full": full.compute,
}


def compute_mask(
    model: nn.Module,
    rule: str,
    density: float = 1e-3,
    *,
    scope: str = "global",
    seed: int = 0,
    tokenizer=None,
    texts: list[str] | None = None,
    source: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    **options,
) -> Mask:
    """Compute a mask with ``rule`` at ``density`` over the model's eligible tensors.

    ``texts``/``source`` are the calibration data (and its provenance) for score rules that need
    data; ``options`` (calib_tokens, seq_len, micro_batch) tune the Fisher estimate.
    """
    if rule not in RULES:
        raise SparseZOError(f"unknown mask rule {rule!r}; choose one of {', '.join(RULES)}")
    if scope not in ("global", "per-tensor"):
        raise SparseZOError(f"unknown scope {scope!r}; choose global or per-tensor")
    if rule != "full":
        exact_count(density, 1)  # validates the range before any expensive work
    else:
        density = 1.0
    params = eligible_tensors(model, include, exclude)  # a 4-bit base: its layers' logical weights
    if any(isinstance(p, QuantWeight) for p in params.values()):
        check_quant_rule(rule)
    ctx = MaskContext(model, params, scope=scope, seed=seed, tokenizer=tokenizer, texts=texts, **options)
    t0 = time.perf_counter()
    with torch.no_grad():  # rules that need gradients (Fisher) re-enable them locally
        indices = RULES[rule](ctx, density)
    meta = {
        "rule": rule, "density": density, "scope": scope, "seed": seed, "source": source,
        "include": include, "exclude": exclude, "fingerprint": model_fingerprint(model), **ctx.info,
    }
    stats = dict(ctx.stats, seconds=round(time.perf_counter() - t0, 2))
    mask = Mask({n: indices[n] for n in params}, {n: tuple(p.shape) for n, p in params.items()}, meta, stats)
    mask.meta.update(num_trainable=mask.num_trainable, num_eligible=mask.num_eligible)
    return mask


def sensitivity_scores(model: nn.Module, tokenizer, texts: list[str], *, include: str | None = None,
                       exclude: str | None = None, **options) -> dict[str, torch.Tensor]:
    """The Fisher scores the ``sensitive`` rule ranks by (for analysis, e.g. the mass curve)."""
    ctx = MaskContext(model, eligible_tensors(model, include, exclude), tokenizer=tokenizer, texts=texts, **options)
    return sensitive.fisher_scores(ctx)


__all__ = ["Mask", "MaskContext", "RULES", "compute_mask", "exact_count", "select_top", "sensitivity_scores"]
