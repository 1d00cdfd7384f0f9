"""CUDA-graph capture of a model's forward per bucketed input shape (small batches at weight-read speed).

Why: at batch 1 and short prompts an eager forward on a GPU is launch overhead (the 135M
architecture takes ~20 ms at 1×32 and at 16×256 alike, ~0.65 ms a layer). A CUDA graph replays
the whole forward's kernels with one launch. ZO needs no recapture when it perturbs: the trainable
entries are written in place into the weights (dense) or a 4-bit layer's ``values`` buffer, and
the graph reads that same memory on every replay.

Shapes are bucketed (rows as given, tokens up to the next power of two ≥ 32, right-padded with
attention mask 0), one graph per bucket, captured on first use. The logits of the real positions
are those of an eager forward of the padded batch; against the unpadded eager forward they may
differ in the last bits (another shape can pick another matmul kernel). Where capture fails (a
model whose forward synchronises with the host, no CUDA) the helper stays eager and says why
(``reason``): keep eager where capture does not work or pay. Not wired into the CLI yet.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_BUCKET = 32


def bucket(tokens: int) -> int:
    """The captured length for ``tokens`` positions: the next power of two, at least ``MIN_BUCKET``."""
    return max(MIN_BUCKET, 1 << max(0, tokens - 1).bit_length())


class _Captured:
    """One graph: static input buffers, the captured forward, its static logits."""

    def __init__(self, model: nn.Module, rows: int, length: int, device: torch.device, warmup: int = 3):
        self.ids = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.model = model
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # allocator and lazy initialisation outside the capture
                self._forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = self._forward()

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.ids.zero_()
        self.mask.zero_()
        self.ids[:, : ids.shape[1]].copy_(ids)
        self.mask[:, : mask.shape[1]].copy_(mask)
        self.graph.replay()
        return self.logits[:, : ids.shape[1]]


class GraphedForward:
    """``logits = f(input_ids, attention_mask)`` through a CUDA graph per bucket, else eagerly.

    The returned logits are a view of the graph's static output: consume (or clone) them before
    the next call of the same bucket.
    """

    def __init__(self, model: nn.Module, max_rows: int = 16, max_tokens: int = 256):
        self.model, self.max_rows, self.max_tokens = model, max_rows, max_tokens
        self.device = next(model.parameters()).device
        self.graphs: dict[tuple[int, int], _Captured | None] = {}
        self.reason: str | None = None if self.device.type == "cuda" else f"no CUDA graphs on {self.device.type}"

    def eager(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, tokens = ids.shape
        if self.reason is not None or rows > self.max_rows or tokens > self.max_tokens:
            return self.eager(ids, mask)
        key = (rows, bucket(tokens))
        if key not in self.graphs:
            try:
                self.graphs[key] = _Captured(self.model, *key, self.device)
            except Exception as e:  # noqa: BLE001 — capture is an optimisation: any failure means eager
                self.reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                log.info("CUDA graph capture unavailable, staying eager: %s", self.reason)
                torch.cuda.synchronize(self.device)
                self.graphs.clear()
                return self.eager(ids, mask)
        return self.graphs[key](ids, mask)
