"""The update arithmetic, one rounding per operation, so a CUDA and a CPU update give the same bits.

Elementwise float32 ops with one rounding each (+, −, ×, ÷ of two tensors, sqrt, casts) are
correctly rounded (IEEE 754) on the CPU and on CUDA, so the same sequence of them gives the same
bits on both. What does not: forms that compute ``y + a·x`` in one kernel (``add_(x, alpha=a)``,
``addcmul_``, ``addcdiv_``), which a CUDA kernel may contract into a fused multiply-add (one
rounding) where the CPU rounds twice; and division by a Python scalar, which CUDA runs as a
multiplication by the scalar's float32 reciprocal while the CPU divides. :class:`Ops` (noise
version 2) writes each as separate ops: ``y + a·x`` as a multiply then an add, ``x / c`` as a
multiply by 1/c computed once in Python (float64) and rounded to float32 by torch.

:class:`LegacyOps` is the arithmetic of noise version 1 (the fused forms, scalar division), kept
so that trajectories written before replay bit for bit on the device they were trained on.
"""

from __future__ import annotations

import torch


class Ops:
    """Single-rounding elementwise updates (noise version 2)."""

    version = 2

    @staticmethod
    def axpy_(y: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
        """y ← y + a·x (in place): the product rounded, then the sum."""
        return y.add_(x * a)

    @staticmethod
    def sq_axpy_(y: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
        """y ← y + a·x² (in place): x·x, ·a and + each rounded in turn."""
        return y.add_(x * x * a)

    @staticmethod
    def div(x: torch.Tensor, c: float) -> torch.Tensor:
        """x / c for a Python scalar c, as x · (1/c): the way CUDA computes it anyway, now on every device."""
        return x * (1.0 / c)


class LegacyOps(Ops):
    """The version-1 arithmetic: the same values sparsezo computed before noise version 2."""

    version = 1

    @staticmethod
    def axpy_(y: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
        return y.add_(x, alpha=a)

    @staticmethod
    def sq_axpy_(y: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
        return y.addcmul_(x, x, value=a)

    @staticmethod
    def div(x: torch.Tensor, c: float) -> torch.Tensor:
        return x / c


def ops_for(version: int) -> Ops:
    """The arithmetic of noise ``version`` (1: legacy, 2: single-rounding)."""
    if version == 1:
        return LegacyOps()
    if version == 2:
        return Ops()
    raise ValueError(f"unknown noise version {version!r}")
