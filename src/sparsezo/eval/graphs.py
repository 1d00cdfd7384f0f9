"""CUDA-graph capture of the decoder forward of a ZO step, per bucketed shape (``--cuda-graphs``).

Why: at batch 1 and short prompts an eager forward on a GPU is launch overhead (the 135M
architecture takes ~20 ms at 1×32 and at 16×256 alike, ~0.65 ms a layer). A CUDA graph replays
the whole forward's kernels with one launch. ZO needs no recapture when it perturbs: the trainable
entries are written in place into the weights (dense) or a 4-bit layer's ``values`` buffer, and
the graph reads that same memory on every replay.

What is captured: the decoder's last hidden state for static (input_ids, attention_mask,
position_ids) buffers, not the logits: B×T×V logits are 800 MB at 16×256 for a 49k vocabulary,
while scoring applies the LM head only where candidates are read (:mod:`sparsezo.eval.scoring`).

Shapes are bucketed, one graph per bucket, captured on first use: rows to the next power of two
(at most ``max_rows``), tokens to the next power of two ≥ 32 (at most ``max_tokens``), so the
micro-batches of a bucketed step reuse a few graphs. A batch is copied in right-padded: its padded
columns get attention 0 and position id 0; the dummy rows attend everywhere (no fully masked row)
and are never read. Larger forwards run eagerly. The hidden states of the real positions are those
of an eager forward of the padded batch; against the unpadded eager forward they may differ in the
last bits (another shape can pick another kernel). Where capture fails (a forward that
synchronises with the host, e.g. some 4-bit kernels) or off CUDA, the helper stays eager and says
why (``reason``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .scoring import Batch, decoder_states

log = logging.getLogger(__name__)

MIN_BUCKET = 32


def bucket(n: int, least: int = MIN_BUCKET) -> int:
    """The captured size for ``n`` positions (or rows, ``least=1``): the next power of two, at least ``least``."""
    return max(least, 1 << max(0, n - 1).bit_length())


class Bucket:
    """One bucket's static input buffers, the decoder forward over them and, once captured, its graph."""

    def __init__(self, decoder: nn.Module, rows: int, length: int, device: torch.device):
        self.decoder = decoder
        self.ids = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.pos = torch.zeros_like(self.ids)
        self.mask = torch.ones_like(self.ids)
        self.mask[:, -1] = 0  # warm up on the path capture records: transformers skips a mask with no padding
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None

    def load(self, batch: Batch) -> None:
        """``batch`` into the buffers: its rows first, right-padded (attention 0, position 0), then dummy rows."""
        rows, width = batch.input_ids.shape
        self.ids.zero_()
        self.pos.zero_()
        self.mask[:rows].zero_()
        self.mask[rows:].fill_(1)
        self.ids[:rows, :width].copy_(batch.input_ids)
        self.pos[:rows, :width].copy_(batch.position_ids)
        self.mask[:rows, :width].copy_(batch.attention_mask)

    def forward(self) -> torch.Tensor:
        return self.decoder(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=False)[0]

    @torch.no_grad()
    def capture(self, pool: tuple, warmup: int = 3) -> None:
        device = self.ids.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # allocator and lazy initialisation outside the capture
                self.forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.hidden = self.forward()
        self.graph = graph

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        self.load(batch)
        self.graph.replay()
        return self.hidden[: batch.input_ids.shape[0], : batch.input_ids.shape[1]]


class GraphedDecoder:
    """``hidden = f(batch)``: the decoder's last hidden state [rows, width, H] through a CUDA graph
    per bucket, else eagerly (:func:`~sparsezo.eval.scoring.decoder_states`).

    All graphs share one memory pool, so a replay may overwrite the memory of another graph's
    output. That is valid only because the returned hidden states (a view of the graph's static
    output) are consumed before the next call: copy what you keep (``candidate_logprobs`` gathers
    its positions at once).
    """

    def __init__(self, model: nn.Module, max_rows: int = 16, max_tokens: int = 256):
        self.model, self.decoder = model, model.get_decoder()
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.device = next(model.parameters()).device
        self.graphs: dict[tuple[int, int], Bucket] = {}
        self.pool: tuple | None = None
        self.reason: str | None = None if self.device.type == "cuda" else f"no CUDA graphs on {self.device.type}"
        self._told_size = False

    def shape(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """The bucket (rows, tokens) a forward of this shape replays, None where it runs eagerly."""
        if rows > self.max_rows or tokens > self.max_tokens:
            return None
        return min(bucket(rows, 1), self.max_rows), min(bucket(tokens), self.max_tokens)

    def eager(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return decoder_states(self.model, batch)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.reason is not None:
            return self.eager(batch)
        key = self.shape(*batch.input_ids.shape)
        if key is None:
            if not self._told_size:
                log.info("forwards above %d rows × %d tokens (here %d × %d) run eagerly, without a CUDA graph",
                         self.max_rows, self.max_tokens, *batch.input_ids.shape)
                self._told_size = True
            return self.eager(batch)
        if key not in self.graphs:
            try:
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                graph = Bucket(self.decoder, *key, self.device)
                graph.capture(self.pool)
                self.graphs[key] = graph
            except Exception as e:  # noqa: BLE001 — capture is an optimisation: any failure means eager
                self.reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                log.info("CUDA graph capture unavailable, staying eager: %s", self.reason)
                torch.cuda.synchronize(self.device)
                self.graphs.clear()
                self.pool = None
                return self.eager(batch)
        return self.graphs[key](batch)
