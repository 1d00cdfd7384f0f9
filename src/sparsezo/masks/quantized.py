"""Fisher scores over a 4-bit base: squared gradients w.r.t. each 4-bit layer's dequantized weight.

Why: the ``sensitive`` rule needs the gradient of every eligible weight, and on a dense base that
means the whole bf16 model on the device (23.5 GiB for 7B) — more than the 4-bit pipeline itself
(train and eval of 7B over NF4 fit in ~4 GiB). Over a 4-bit base each NF4/int4 layer instead
runs through :class:`DequantLinear`: forward is the layer's own (nothing saved but its input),
and backward recomputes the dequantized weight W (QLoRA-style) to give ∂L/∂x = g·W and, for a
layer being scored, ∂L/∂W = gᵀx, which goes straight to the score sink. So only the layer being
differentiated has a dense weight and a dense gradient alive.

The score is that of the dequantized weights (the model the 4-bit run actually fine-tunes), not
of the original dense ones: they differ by the quantization error, so the masks overlap but are
not identical (tests bound the difference on a small model). Score names are the logical weight
names (``…q_proj.weight``), so the mask is used as any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import SparseZOError
from ..model.params import DEFAULT_INCLUDE, eligible_parameters, logical_tensors
from ..quant import QUANT_LAYERS

GradSink = Callable[[torch.Tensor], None]


class DequantLinear(torch.autograd.Function):
    """y = layer(x); backward recomputes the layer's dense weight instead of keeping it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: torch.Tensor, layer: nn.Module, sink: GradSink | None) -> torch.Tensor:
        ctx.layer, ctx.sink = layer, sink
        ctx.save_for_backward(x)
        with torch.no_grad():
            return type(layer).forward(layer, x)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        w = layer.dequantized()  # recomputed: the only dense weight alive, freed on return
        g2 = gy.reshape(-1, layer.out_features).to(w.dtype)
        gx = (g2 @ w).reshape(*x.shape[:-1], layer.in_features).to(x.dtype) if ctx.needs_input_grad[0] else None
        del w
        if ctx.sink is not None:
            ctx.sink(g2.T @ x.reshape(-1, layer.in_features).to(g2.dtype))  # ∂L/∂W, [out, in]
        return gx, None, None, None


class QuantWeight:
    """A 4-bit layer's logical weight as the Fisher pass sees it: a shape, a size, and gradients
    delivered to a sink while it is attached (:meth:`attach`)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.shape = torch.Size((layer.out_features, layer.in_features))
        self.dtype = layer.dtype
        self.sink: GradSink | None = None

    def numel(self) -> int:
        return self.shape.numel()

    def attach(self, sink: GradSink) -> Callable[[], None]:
        """Send ∂L/∂W of every backward to ``sink`` until the returned function is called."""
        self.sink = sink

        def detach() -> None:
            self.sink = None
        return detach


def quant_weights(model: nn.Module, include: str | None = None, exclude: str | None = None) -> dict[str, QuantWeight]:
    """The model's 4-bit layers whose logical weight names pass ``include``/``exclude`` (regexes), model order."""
    import re


    inc, exc = re.compile(include or DEFAULT_INCLUDE), re.compile(exclude) if exclude else None
    out = {}
    for mname, m in model.named_modules():
        name = f"{mname}.weight"
        if isinstance(m, QUANT_LAYERS) and inc.search(name) and not (exc and exc.search(name)):
            out[name] = QuantWeight(m)
    return out


@contextmanager
def recomputing(model: nn.Module, weights: dict[str, QuantWeight]) -> Iterator[None]:
    """Within the block every 4-bit layer of ``model`` runs through :class:`DequantLinear` (scored
    or not: a plain F.linear would keep each layer's dense weight for backward)."""

    by_layer = {id(w.layer): w for w in weights.values()}
    layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    if not layers:
        yield
        return
    handle = torch.zeros((), device=layers[0].idx.device, requires_grad=True)  # puts each layer on the graph
    for m in layers:
        w = by_layer.get(id(m))
        m.forward = lambda x, m=m, w=w: DequantLinear.apply(x, handle, m, None if w is None else w.sink)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def eligible_tensors(model: nn.Module, include: str | None = None,
                     exclude: str | None = None) -> dict[str, nn.Parameter | QuantWeight]:
    """What a mask may select from, in model order: the eligible dense parameters and, on a 4-bit
    base, the 4-bit layers' logical weights (a fully quantized base has no dense eligible ones)."""

    quant = quant_weights(model, include, exclude)
    if not quant:
        return eligible_parameters(model, include, exclude)
    try:
        dense = eligible_parameters(model, include, exclude)
    except SparseZOError:  # every eligible linear is 4-bit
        dense = {}
    return {n: quant.get(n) or dense[n] for n in logical_tensors(model) if n in quant or n in dense}


def check_quant_rule(rule: str) -> None:
    """Over a 4-bit base only rules that need no dense weight values apply."""
    if rule not in ("sensitive", "sensitive-task", "random"):
        raise SparseZOError(f"mask rule {rule!r} reads dense weight values, which a 4-bit base does not keep; use "
                            "sensitive (Fisher over the dequantized weights) or random, or compute it on the dense model")
