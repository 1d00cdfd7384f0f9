"""What every frozen 4-bit layer shares: the exact trainable entries, the bias, and their life cycle.

A 4-bit layer (NF4, int4) keeps the mask's entries exact in the compute dtype — ``idx`` (flat
positions), ``values`` (what ZO writes) and ``head`` (first entries, for model fingerprints) —
next to its format's codes. Masks, deltas, ``TrainableParams`` and the merged export only see
this part, so it lives here once; a format adds its codes, ``quantize_`` and ``dequantized``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseZOError


class ExactEntriesLinear(nn.Module):
    """Base of the 4-bit linears: exact-entry buffers, bias, construction from a dense weight."""

    in_features: int
    out_features: int
    dtype: torch.dtype

    def _exact_buffers(self, k: int, bias: bool, device) -> None:
        """Register ``idx``/``values``/``head`` and the (frozen) bias; call after the format's buffers."""
        n = self.in_features * self.out_features
        self.register_buffer("idx", torch.empty(k, dtype=torch.int64, device=device))
        self.register_buffer("values", torch.empty(k, dtype=self.dtype, device=device))
        self.register_buffer("head", torch.empty(min(64, n), dtype=self.dtype, device=device))  # for fingerprints
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=self.dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor | None,
                    dtype: torch.dtype, *options):
        """Quantize ``weight``; the entries ``idx`` keep their original values (cast to ``dtype``).
        ``options``: the format's own constructor arguments after ``k`` (NF4: nested; int4: group)."""
        out_f, in_f = weight.shape
        k = 0 if idx is None else idx.numel()
        layer = cls(in_f, out_f, dtype, k, *options, bias=bias is not None, device=weight.device)
        layer.quantize_(weight, idx)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    def _dense(self, weight: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``weight`` checked against this layer's shape, in the compute dtype on ``device``."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise SparseZOError(f"weight of shape {tuple(weight.shape)} does not fit a {self.out_features}x"
                                f"{self.in_features} layer")
        return weight.detach().to(device=device, dtype=self.dtype)

    def quantize_(self, weight: torch.Tensor, idx: torch.Tensor | None) -> None:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)
