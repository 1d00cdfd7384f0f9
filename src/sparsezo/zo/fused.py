"""Both perturbed forwards of a ZO step in one pass (``--fused-pm``).

A step scores the same batch at θ+εz and θ−εz, and the two models differ only in the k
trainable entries. Here the batch is stacked as [x; x] and run once with the weights at cast(θ):
every linear holding trainable entries gets a forward hook that adds, to each half of its output,
the sparse correction x[:, cols] · (cast(θ ± εz) − cast(θ)) (see :func:`sparse_add_`); an int4
layer, which adds a correction of its own anyway, takes the two deltas into it (``pm_delta``). The base
matmul — for a 4-bit layer, reading and dequantizing its codes — runs once per step instead of
twice, on twice the rows, which is where a batch-1 step on a big model is cheaper.

The perturbation applied is exactly the unfused one (the same cast values), so the update
direction is unchanged; L± differ from two separate forwards only by float rounding (the base
matmul on 2M rows and the correction added after it). Replay is unaffected: it only reads the
recorded projected gradients. Supported: sparse masks over linear weights (dense, NF4 or int4);
:meth:`FusedPM.supports` says so before a run starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SparseZOError
from ..quant import QUANT_LAYERS
from ..quant.int4 import Int4Linear, sparse_add_, sparse_layout
from ..eval.scoring import Batch, Forward, candidate_logprobs, loss_from_scores, micro_batch_loss
from .trainable import TrainableParams


def doubled(b: Batch) -> Batch:
    """The batch stacked on itself: rows, query positions and candidates of the copy shifted."""
    rows, queries, slots = b.input_ids.shape[0], b.rows.numel(), b.gold.numel() * b.max_cands
    two = lambda t, shift=0: torch.cat([t, t + shift])  # noqa: E731
    return Batch(two(b.input_ids), two(b.attention_mask), two(b.position_ids), two(b.rows, rows), two(b.cols),
                 two(b.query, queries), two(b.target), two(b.owner, slots), two(b.gold), two(b.num_cands), b.max_cands)


class PMLoss:
    """A step's loss function: ``loss()`` scores the batch at the weights as they are (the unfused
    path calls it twice); ``loss.pair()`` gives (first half, second half) of one doubled forward.

    ``batch`` may be a list of micro-batches of the step (``scoring.micro_batches``): the loss is then
    their example-weighted mean, the step's mean loss without padding every example to the longest.
    ``forward``: the decoder's hidden states for ``loss()`` (e.g. a ``GraphedDecoder``; None: eager).
    """

    def __init__(self, model: nn.Module, batch: Batch | list[Batch], kind: str = "ce", forward: Forward | None = None):
        self.model, self.kind, self.forward = model, kind, forward
        self.batches = batch if isinstance(batch, list) else [batch]
        self._doubled: list[Batch] | None = None

    @property
    def max_tokens(self) -> int:
        """Token positions of the step's largest forward (what decides whether fusing it pays)."""
        return max(b.input_ids.numel() for b in self.batches)

    def __call__(self) -> float:
        return micro_batch_loss(self.model, self.batches, self.kind, self.forward)

    def pair(self) -> tuple[float, float]:
        # always eager, never ``forward``: the fused hooks read this step's ±ε deltas (FusedPM._delta), a
        # per-step tensor that a captured graph would freeze at the values (None) it saw when captured
        if self._doubled is None:
            self._doubled = [doubled(b) for b in self.batches]
        halves = []
        for b, d in zip(self.batches, self._doubled):
            scores = candidate_logprobs(self.model, d, mean=(self.kind == "lm"))
            n = b.gold.numel()
            halves.append((loss_from_scores(scores[:n], b, self.kind), loss_from_scores(scores[n:], b, self.kind), n))
        if len(halves) == 1:  # exactly the one batch's losses (× n / n may move the last bit)
            return halves[0][:2]
        total = sum(n for _, _, n in halves)
        return sum(p * n for p, _, n in halves) / total, sum(m * n for _, m, n in halves) / total


class FusedPM:
    """Adds the ±ε sparse corrections to the two halves of a stacked batch: forward hooks on dense
    and NF4 linears, ``pm_delta`` on int4 ones (which fold it into their own correction)."""

    def __init__(self, model: nn.Module, params: TrainableParams, max_tokens: int | None = None):
        """``max_tokens``: fuse only batches of at most this many token positions (None: every batch)."""
        reason = self.unsupported(model, params)
        if reason:
            raise SparseZOError(f"--fused-pm cannot run here: {reason}; run without --fused-pm")
        self.params, self.max_tokens = params, max_tokens
        self._delta: torch.Tensor | None = None  # [2, |θ|] fp32 while a fused forward runs
        self._hooks = []
        self._int4: list[tuple[Int4Linear, int, int]] = []  # layers that take the deltas into their own correction
        for k, name in enumerate(params.names):
            module = model.get_submodule(name.rpartition(".")[0])
            s, e = params.offsets[k], params.offsets[k + 1]
            if isinstance(module, Int4Linear):
                self._int4.append((module, s, e))
                continue
            idx = module.idx if isinstance(module, QUANT_LAYERS) else params.indices[k]
            layout = sparse_layout(idx, module.in_features, module.out_features)
            self._hooks.append(module.register_forward_hook(self._hook(layout, module.in_features, s, e)))

    @staticmethod
    def unsupported(model: nn.Module, params: TrainableParams) -> str | None:
        """Why the fused forward cannot serve this trainable set (None when it can)."""
        if params.mask.is_full:
            return "full ZO perturbs every weight, so the correction would be a dense matmul"
        for name in params.names:
            mname, _, pname = name.rpartition(".")
            module = model.get_submodule(mname) if mname else model
            if pname != "weight" or not isinstance(module, (nn.Linear, *QUANT_LAYERS)):
                return f"{name} is not a linear layer's weight"
        return None

    @staticmethod
    def supports(model: nn.Module, params: TrainableParams) -> bool:
        return FusedPM.unsupported(model, params) is None

    def serves(self, loss_fn: Callable[[], float]) -> bool:
        """Whether this step's loss is scored fused: it can pair, and its batch is within ``max_tokens``."""
        if not hasattr(loss_fn, "pair"):
            return False
        return self.max_tokens is None or loss_fn.max_tokens <= self.max_tokens

    def _hook(self, layout: tuple[torch.Tensor, ...], in_features: int, s: int, e: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._delta is None:
                return
            x = inputs[0].reshape(-1, in_features)
            if x.shape[0] % 2:
                raise SparseZOError("a fused ±ε forward needs the batch stacked on itself (an even row count)")
            sparse_add_(output.view(x.shape[0], -1), x, layout, self._delta[:, s:e])
        return hook

    @torch.no_grad()
    def losses(self, plus: torch.Tensor, minus: torch.Tensor, pair: Callable[[], tuple[float, float]]) -> tuple[float, float]:
        """(L+, L−) from one ``pair()`` forward, for weights cast(θ) and perturbed entries ``plus``/``minus``
        (the values the unfused path would write, in the compute dtype)."""
        current = self.params.rounded(self.params.theta)
        self._delta = torch.stack([plus.float() - current, minus.float() - current])
        for module, s, e in self._int4:
            module.pm_delta = self._delta[:, s:e]
        try:
            return pair()
        finally:
            self._delta = None
            for module, _, _ in self._int4:
                module.pm_delta = None

    def remove(self) -> None:
        """Detach the hooks (the model computes as before)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._int4.clear()
