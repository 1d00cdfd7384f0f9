"""A frozen group-wise int4 linear layer on PyTorch's own int4 kernels; trainable entries exact.

Layout: asymmetric int4 in groups of ``group`` inputs (64 by default): per (output row, group) a
scale s and a zero z, and w = (q − 8)·s + z for a code q in 0..15 — the convention of
``torch.ops.aten._weight_int4pack_mm_for_cpu``. Codes are stored as ``qweight`` [N, K/2] uint8
in 32-row blocks ([N/32, K, 16] viewed as [N, K/2]: byte (b, k, d) holds rows 32b+d in the low
and 32b+16+d in the high nibble), scales and zeros as ``scales_zeros`` [K/group, N, 2] in the
compute dtype. That layout is fixed, so a saved folder loads on any machine; it is what
inductor's AMX int4 micro-kernel reads directly.

Forward = ``int4_mm(x) + x[:, cols] · (values − qvalues)`` scattered into the output rows: the
4-bit matmul never sees the exact entries, and ZO only writes ``values`` (k entries). The
correction is a gather/multiply/``index_add_`` of M × k products (at 0.1% density ≪ the
matmul's M × N × K).

Which 4-bit matmul (measured on the 2-core AMX CPU, 7B shapes, see benchmarks/README.md):
- bf16 on CPU: inductor's WOQ-int4 AMX template, compiled once per weight shape with the token
  count dynamic (one compiled function serves every layer of that shape; ~5-10 s each, cached
  on disk by inductor). ATen's eager kernel re-dequantizes the weights for every 4 rows of x,
  so it costs ~3× a dense bf16 matmul at 32 tokens, ~9× at 256; the template ~1.1×. Inductor
  only offers the template for constant (frozen) weights, which would mean one compile per
  layer and no writable exact values, so the weight-is-constant check is lifted while our
  calls compile; the result of each compiled shape is checked against a dequantized reference
  once, and any failure (no AMX, no compiler, an inductor change) falls back to the eager path.
- other CPUs / fp32 / fallback: ``_weight_int4pack_mm_for_cpu`` on its own packing, built once
  from ``qweight`` at first use (its layout depends on the CPU's vector width).
- CUDA and other devices: dequantize + ``F.linear`` (no CPU op there; no code change needed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import SparseZOError
from .exact import ExactEntriesLinear

log = logging.getLogger(__name__)
# torch.sparse_csr_tensor warns on every first use that CSR support is "beta"; the one product we
# use (CSR × dense, fp32) is tested here, and the warning would be printed on every run.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

GROUP = 64
GROUPS = (32, 64, 128)
ROWS = 32  # output rows per packed block (the AMX micro-kernel's block_n)


def _qparams(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q [N, K] uint8 and scale, zero [N, K/group] in ``dtype`` with w ≈ (q − 8)·s + z.

    Scale and zero are rounded to ``dtype`` first and the codes chosen against the rounded
    values; a constant group gets a tiny scale so its zero is the value itself.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.full_like(lo, 1e-8)).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round().add_(8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(n, k), scale, zero


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes → ``qweight`` [N, K/2] in 32-row blocks (see the module docstring)."""
    n, k = q.shape
    t = q.reshape(n // ROWS, 2, ROWS // 2, k)
    return (t[:, 0] | (t[:, 1] << 4)).transpose(1, 2).contiguous().reshape(n, k // 2)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight`` [N, K/2] → codes [N, K] uint8 (inverse of :func:`pack`)."""
    n, k2 = qweight.shape
    p = qweight.reshape(n // ROWS, k2 * 2, ROWS // 2)
    return torch.stack([p & 15, p >> 4], 1).transpose(2, 3).reshape(n, k2 * 2)


def dequantize(qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight the codes stand for, (q − 8)·s + z computed in fp32, rounded once."""
    q = unpack(qweight)
    n, k = q.shape
    sz = scales_zeros.float().transpose(0, 1)  # [N, K/group, 2]
    w = (q.reshape(n, k // group, group).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(n, k).to(dtype)


# --- compiled CPU kernels ------------------------------------------------------------------

def _mm(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group, scales_zeros)


@contextlib.contextmanager
def _weights_as_inputs() -> Iterator[None]:
    """Let inductor's int4 template take a weight that is a graph input, for the calls inside."""
    import torch._inductor.lowering  # noqa: F401 (quantized_lowerings imports need it first)
    import torch._inductor.quantized_lowerings as ql
    import torch._inductor.utils as iu

    saved = ql.use_cpp_gemm_template
    ql.use_cpp_gemm_template = functools.partial(iu.use_cpp_gemm_template, require_constant_mat2=False)
    try:
        yield
    finally:
        ql.use_cpp_gemm_template = saved


_COMPILED: dict[tuple[int, int, int], Callable | None] = {}
_COMPILED_DEQUANT: dict[tuple[int, int, int], Callable | None] = {}


def _per_shape(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with its own code object, so each weight shape compiles once and shapes
    never share (and exhaust) one recompile budget."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name)


def _compiled(n: int, k: int, group: int) -> Callable | None:
    """The compiled int4 matmul of one weight shape; None once it has failed here."""
    key = (n, k, group)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_per_shape(_mm, f"_int4_mm_{n}x{k}_g{group}"), dynamic=False, fullgraph=True,
                                       options={"max_autotune": True,
                                                "max_autotune_gemm_backends": "CPP"})  # never ATen: another layout
    return _COMPILED[key]


def _compiled_dequant(n: int, k: int, group: int) -> Callable | None:
    """The compiled (fused, 3-5× faster than eager) :func:`dequantize` of one shape; None once failed.
    (The exact entries are written afterwards, eagerly: their count differs between layers of a
    shape, and a compiled function taking them would recompile per layer.)"""
    key = (n, k, group)
    if key not in _COMPILED_DEQUANT:
        _COMPILED_DEQUANT[key] = torch.compile(_per_shape(dequantize, f"_int4_dequant_{n}x{k}_g{group}"),
                                               dynamic=False, fullgraph=True)
    return _COMPILED_DEQUANT[key]


def _reference(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    return x.float() @ dequantize(qweight, scales_zeros, group, torch.float32).T


KERNEL_MAX_ROWS = 256
# The 4-bit matmul + correction path serves at most KERNEL_MAX_ROWS rows and layers of at least
# this many weights; smaller layers dequantize (compiled: ~2 ms for SmolLM2's largest) and run
# dense, which measured 2-5x faster there than the kernel's and the correction's fixed costs. On
# the 7B shapes (idle CPU) the kernel + correction beats dequantize (~85 ms a layer) + dense by
# 2-3x at 128-256 rows and by 15-25% at 512; from 1024 rows dequantization wins. 512 would be the
# better limit by that layer benchmark; 256 is what the end-to-end runs used.
KERNEL_MIN_WEIGHTS = 1 << 22


def sparse_layout(idx: torch.Tensor, in_features: int, out_features: int) -> tuple[torch.Tensor, ...]:
    """(rows, cols, CSR row pointers) of flat entries ``idx`` (sorted, as masks store them):
    computed once per layer, since every small op of a forward costs milliseconds on busy cores."""
    rows, cols = idx // in_features, idx % in_features
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    return rows, cols, crow


def sparse_add_(y: torch.Tensor, x: torch.Tensor, layout: tuple[torch.Tensor, ...], delta: torch.Tensor) -> None:
    """y[:, r] += Σ x[:, c] · delta over the entries (r, c) of ``layout`` (:func:`sparse_layout`), in place.

    ``delta`` is [k] (every row of x) or [H, k] for H equal consecutive row groups of x (the ±ε
    halves of a fused forward). Two ways, by which touches less memory per row of x: a gather
    + ``index_add_`` (an M × k temporary) or a CSR sparse × dense product in fp32 (an fp32 copy
    of x and a transposed M × out result: M × (in + out)). Measured: on the 7B shapes (k = 45k,
    in + out = 15k) the CSR product costs 1.3-1.7 ms at 32 rows (0.2× the dense matmul), the
    gather 2-4× more at every row count from 32 to 2048; on SmolLM2's layers (k ≈ 500 ≪ in +
    out) the CSR product made a fused 16×256 step 3.6× two forwards.
    """
    rows, cols, crow = layout
    n, k, in_features = y.shape[1], cols.numel(), x.shape[1]
    if k == 0:  # a layer the mask left without entries (a global top-k can)
        return
    deltas = delta.reshape(-1, k)
    xs, ys = x.view(deltas.shape[0], -1, in_features), y.view(deltas.shape[0], -1, n)
    for xh, yh, dh in zip(xs, ys, deltas):
        if k > in_features + n:
            s = torch.sparse_csr_tensor(crow, cols, dh.float(), (n, in_features), check_invariants=False)
            yh.add_(torch.sparse.mm(s, xh.float().t()).t())
        else:
            yh.index_add_(1, rows, xh.index_select(1, cols).mul_(dh.to(x.dtype)))


# --- the layer -----------------------------------------------------------------------------

class Int4Linear(ExactEntriesLinear):
    """``y = x @ W.T + b`` with W = int4-dequantized weight whose entries ``idx`` are ``values``."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, k: int, group: int = GROUP,
                 bias: bool = False, device=None):
        super().__init__()
        if group not in GROUPS or in_features % group or out_features % ROWS:
            raise SparseZOError(
                f"a {out_features}x{in_features} weight does not fit int4 groups of {group} inputs and blocks of "
                f"{ROWS} outputs (in must be a multiple of the group, out of {ROWS}; group one of {GROUPS}); "
                "exclude that tensor from the mask (--exclude) or use --quant nf4"
            )
        self.in_features, self.out_features, self.dtype, self.group = in_features, out_features, dtype, group
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros", torch.empty(in_features // group, out_features, 2, dtype=dtype,
                                                         device=device))
        self.register_buffer("qvalues", torch.empty(k, dtype=torch.float32, device=device))  # 4-bit w at idx
        self._exact_buffers(k, bias, device)
        self._aten_pack: torch.Tensor | None = None  # the eager CPU kernel's own packing, built on first use
        self._layout: tuple[torch.Tensor, ...] | None = None  # sparse_layout of idx, built on first use
        # [H, k] extra deltas on the exact entries for H equal row groups of x, set by a fused ±ε
        # forward (zo/fused.py) for its duration: folded into this layer's own correction, so the
        # fused step costs one CSR product per half, not one for the layer plus one per half.
        self.pm_delta: torch.Tensor | None = None

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Fill this layer from a dense ``weight``; entries ``idx`` are kept exact in the compute dtype."""
        w = self._dense(weight, self.qweight.device)
        q, scale, zero = _qparams(w, self.group, self.dtype)
        self.qweight.copy_(pack(q))
        self.scales_zeros.copy_(torch.stack([scale, zero], -1).transpose(0, 1))
        self._aten_pack = self._layout = None
        if idx is not None:
            self.idx.copy_(idx.to(self.idx))
        flat = w.reshape(-1)
        self.values.copy_(flat[self.idx])
        self.head.copy_(flat[: self.head.numel()])
        rows, cols = self.idx // self.in_features, self.idx % self.in_features
        s = self.scales_zeros[cols // self.group, rows].float()
        self.qvalues.copy_((q[rows, cols].float() - 8) * s[:, 0] + s[:, 1])

    def dequantized(self) -> torch.Tensor:
        """The dense weight this layer stands for (dequantized codes, masked entries exact).

        On CPU through the compiled kernel when it gives the eager function's bytes (checked on
        first use of each shape), so forward and the merged export always agree exactly.
        """
        args = (self.qweight, self.scales_zeros, self.group, self.dtype)
        key = (self.out_features, self.in_features, self.group)
        fn = _compiled_dequant(*key) if self.qweight.device.type == "cpu" else None
        w = None
        if fn is not None:
            try:
                with torch.no_grad():
                    w = fn(*args)
                if not getattr(fn, "sparsezo_checked", False):
                    if not torch.equal(w, dequantize(*args)):
                        raise SparseZOError("compiled int4 dequantization differs from the eager one")
                    fn.sparsezo_checked = True
            except Exception as e:  # noqa: BLE001 — the compiled path is optional: fall back to eager
                log.info("int4 %dx%d: compiled dequantization unavailable (%s); using eager", key[0], key[1], e)
                _COMPILED_DEQUANT[key] = w = None
        w = dequantize(*args) if w is None else w
        w.view(-1).index_copy_(0, self.idx, self.values)
        return w

    def base_mm(self, x: torch.Tensor) -> torch.Tensor:
        """[M, K] → [M, N] on CPU: the 4-bit matmul alone (no exact entries, no bias)."""
        x = x.contiguous()
        if x.dtype == torch.bfloat16 and x.shape[0] > 0:
            y = self._amx_mm(x)
            if y is not None:
                return y
        if self._aten_pack is None:
            self._aten_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(self.qweight).int(), 1)
        return _mm(x, self._aten_pack, self.scales_zeros.to(x.dtype), self.group)

    def _amx_mm(self, x: torch.Tensor) -> torch.Tensor | None:
        key = (self.out_features, self.in_features, self.group)
        fn = _compiled(*key)
        if fn is None:
            return None
        m = x.shape[0]
        xp = torch.cat([x, x.new_zeros(1, x.shape[1])]) if m == 1 else x  # size 1 would be specialised
        torch._dynamo.mark_dynamic(xp, 0)
        first = not getattr(fn, "sparsezo_checked", False)
        try:
            with _weights_as_inputs(), torch.no_grad():
                y = fn(xp, self.qweight, self.scales_zeros, self.group)[:m]
            if first:
                ref = _reference(x, self.qweight, self.scales_zeros, self.group)
                if not (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-3:
                    raise SparseZOError("compiled int4 matmul disagrees with the dequantized reference")
                fn.sparsezo_checked = True
            return y
        except Exception as e:  # noqa: BLE001 — any failure of the optional compiled path means: use the eager one
            log.info("int4 %dx%d: compiled AMX matmul unavailable here (%s: %s); using the eager kernel",
                     key[0], key[1], type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _COMPILED[key] = None
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Up to ``KERNEL_MAX_ROWS`` rows of a big layer on CPU: 4-bit matmul + sparse correction.
        Otherwise (more rows, a small layer, another device): dequantize, write the exact entries,
        dense matmul — the dequantization is then small next to the matmul, the correction is not."""
        x2 = x.reshape(-1, self.in_features)
        small = self.in_features * self.out_features < KERNEL_MIN_WEIGHTS
        extra = self.pm_delta
        if extra is not None and x2.shape[0] % extra.shape[0]:
            raise SparseZOError(f"a fused ±ε forward needs {extra.shape[0]} equal row groups, got {x2.shape[0]} rows")
        if x2.device.type != "cpu" or x2.shape[0] > KERNEL_MAX_ROWS or small:
            y = F.linear(x2, self.dequantized())
            if extra is not None and self.idx.numel():
                sparse_add_(y, x2, self.layout(), extra)
        else:
            y = self.base_mm(x2)
            if self.idx.numel():
                delta = self.values.float() - self.qvalues
                sparse_add_(y, x2, self.layout(), delta if extra is None else delta + extra)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def layout(self) -> tuple[torch.Tensor, ...]:
        """:func:`sparse_layout` of the exact entries (idx is fixed once the layer is filled)."""
        if self._layout is None:
            self._layout = sparse_layout(self.idx, self.in_features, self.out_features)
        return self._layout

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 g{self.group}, trainable={self.idx.numel()}, "
                f"dtype={self.dtype}")
