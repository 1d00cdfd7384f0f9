"""``full``: every eligible entry trainable, the MeZO full-parameter baseline (no index lists)."""

from .base import MaskContext


def compute(ctx: MaskContext, density: float) -> dict:
    return {name: None for name in ctx.params}
