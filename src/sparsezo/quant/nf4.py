"""A frozen 4-bit NF4 linear layer whose few trainable entries stay exact in 16-bit.

Layout (SensZOQ): the weight is stored as bitsandbytes NF4 codes (two per byte) with one
absmax per 64-entry block (itself 8-bit quantized, "double quant", by default); the masked
entries keep their original 16-bit values in ``values`` at flat positions ``idx``.
Forward = dequantize → overwrite the masked entries → ``F.linear``. Only one layer's dense
weight exists at a time, and ZO only ever writes ``values`` (k entries), never the codes.

Why not a dense 4-bit matmul plus a sparse correction ``x @ S`` with S = (θ − dequant(W))[idx]:
on CPU there is no fused 4-bit matmul (bitsandbytes dequantizes first anyway), and a sparse
matmul of 0.1% density is slower than rewriting k entries of the dequantized weight; on
CUDA the correction adds a second kernel per layer. Dequantize-and-overwrite costs one
scatter of k entries per layer and keeps the numerics identical to the dense model with the
same weights.

bitsandbytes' quantize/dequantize run on CPU and CUDA (0.45+), so one file format serves both.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import SparseZOError
from .exact import ExactEntriesLinear

BLOCKSIZE = 64


def bnb_functional():
    """Import bitsandbytes.functional, quietly (its CPU backend warns about an optional hub kernel)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise SparseZOError("--quant nf4 needs bitsandbytes: pip install 'sparsezo[nf4]'") from e
    return bnbf


class NF4Linear(ExactEntriesLinear):
    """``y = x @ W.T + b`` with W = NF4-dequantized weight whose entries ``idx`` are ``values``."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, k: int, nested: bool = True,
                 bias: bool = False, device=None):
        super().__init__()
        n = in_features * out_features
        if n % BLOCKSIZE:
            raise SparseZOError(
                f"a {out_features}x{in_features} weight has {n} entries, not a multiple of the NF4 block size "
                f"{BLOCKSIZE}; exclude that tensor from the mask (--exclude) or run without --quant"
            )
        self.in_features, self.out_features, self.dtype, self.nested = in_features, out_features, dtype, nested
        blocks = n // BLOCKSIZE
        self.register_buffer("codes", torch.empty(n // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))
        if nested:
            self.register_buffer("absmax2", torch.empty(-(-blocks // 256), dtype=torch.float32, device=device))
            self.register_buffer("code2", torch.empty(256, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device))
        self._exact_buffers(k, bias, device)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Fill this layer from a dense ``weight``; entries ``idx`` are kept exact in the compute dtype."""
        w = self._dense(weight, self.codes.device)
        codes, qs = bnb_functional().quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=self.nested)
        self.codes.copy_(codes)
        self.absmax.copy_(qs.absmax)
        self.code.copy_(qs.code)
        if self.nested:
            self.absmax2.copy_(qs.state2.absmax)
            self.code2.copy_(qs.state2.code)
            self.offset.copy_(qs.offset)
        if idx is not None:
            self.idx.copy_(idx.to(self.idx))
        self.values.copy_(w.reshape(-1)[self.idx])
        self.head.copy_(w.reshape(-1)[: self.head.numel()])

    def _quant_state(self):
        bnbf = bnb_functional()
        state2 = bnbf.QuantState(absmax=self.absmax2, code=self.code2, blocksize=256, dtype=torch.float32) if self.nested else None
        return bnbf.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.code,
                               blocksize=BLOCKSIZE, quant_type="nf4", dtype=self.dtype,
                               offset=self.offset if self.nested else None, state2=state2)

    def dequantized(self) -> torch.Tensor:
        """The dense weight this layer computes with (dequantized codes, masked entries exact)."""
        w = bnb_functional().dequantize_4bit(self.codes, self._quant_state())
        w.view(-1).index_copy_(0, self.idx, self.values)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4, trainable={self.idx.numel()}, dtype={self.dtype}"
