"""Candidate scoring: log-likelihood of each candidate completion given its prompt.

All candidates of all examples in a batch go through one padded forward. Logits are computed
only at the positions that predict candidate tokens (never B×T×V): the decoder's hidden
states are gathered at those positions and only they go through the LM head. When every
candidate is a single token the prompt is run once and all candidates are read from its
last position (the shared prefix is computed once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseZOError
from ..tasks import Example
from .truncation import report_truncation, truncate, truncation_side

LOSSES = ("ce", "lm", "acc")


@dataclass
class Encoded:
    prompt: list[int]
    cands: list[list[int]]
    gold: int


@dataclass
class Batch:
    """A padded forward plus where to read which candidate token's log-prob."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor  # per query position: row in the batch
    cols: torch.Tensor  # per query position: column (predicting the next token)
    query: torch.Tensor  # per target token: which query position holds its distribution
    target: torch.Tensor  # per target token: the token id
    owner: torch.Tensor  # per target token: flat (example * max_cands + candidate)
    gold: torch.Tensor  # per example: gold candidate index
    num_cands: torch.Tensor  # per example: number of candidates
    max_cands: int


def encode(tokenizer, examples: list[Example], max_length: int = 1024) -> list[Encoded]:
    """Tokenize prompts (with the tokenizer's special tokens) and candidates (without).

    Prompts that would not fit with their longest candidate are cut on the tokenizer's
    :func:`~sparsezo.eval.truncation.truncation_side` (default left, keeping the end of the prompt,
    which is where the question and answer cue are); candidates are never cut. Cutting changes what
    the model sees, so it is reported (once per distinct set of examples), never silent.
    """
    out, cut, side = [], [], truncation_side(tokenizer)
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        cands = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.candidates]
        if any(len(c) == 0 for c in cands):
            raise SparseZOError(f"a candidate of prompt {ex.prompt[:40]!r} tokenizes to nothing: {ex.candidates}")
        room = max_length - max(len(c) for c in cands)
        if len(prompt) > room:
            cut.append(len(prompt) - room)
            prompt = truncate(prompt, room, side)
        out.append(Encoded(prompt, cands, ex.gold))
    if cut:
        report_truncation(tokenizer, len(cut), len(examples), max(cut), max_length, side)
    return out


def make_batch(encoded: list[Encoded], pad_id: int, padding_side: str = "right", device="cpu") -> Batch:
    """Lay out one forward for all candidates of all ``encoded`` examples."""
    shared = all(len(c) == 1 for e in encoded for c in e.cands)
    seqs, rows, cols, query, target, owner = [], [], [], [], [], []
    max_c = max(len(e.cands) for e in encoded)
    for i, e in enumerate(encoded):
        if shared:  # one row per example; every candidate read at the prompt's last position
            rows.append(len(seqs))
            cols.append(len(e.prompt) - 1)
            seqs.append(e.prompt)
            for j, c in enumerate(e.cands):
                query.append(len(rows) - 1)
                target.append(c[0])
                owner.append(i * max_c + j)
            continue
        for j, c in enumerate(e.cands):  # one row per (example, candidate)
            r = len(seqs)
            seqs.append(e.prompt + c[:-1])
            for t, tok in enumerate(c):
                rows.append(r)
                cols.append(len(e.prompt) - 1 + t)
                query.append(len(rows) - 1)
                target.append(tok)
                owner.append(i * max_c + j)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    shift = [width - len(s) if padding_side == "left" else 0 for s in seqs]
    for r, s in enumerate(seqs):
        ids[r, shift[r] : shift[r] + len(s)] = torch.tensor(s)
        attn[r, shift[r] : shift[r] + len(s)] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    cols = [c + shift[r] for r, c in zip(rows, cols)]
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Batch(ids.to(device), attn.to(device), pos.to(device), t(rows), t(cols), t(query), t(target), t(owner),
                 t([e.gold for e in encoded]), t([len(e.cands) for e in encoded]), max_c)


# The decoder's last hidden state [rows, width, H] of a batch: ``decoder_states`` (eager) or a captured
# replay of it (eval.graphs.GraphedDecoder, ``--cuda-graphs``).
Forward = Callable[[Batch], torch.Tensor]


def decoder_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The decoder's last hidden state of ``batch`` [rows, width, H], computed eagerly."""
    return model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )[0]


@torch.no_grad()
def candidate_logprobs(model: nn.Module, batch: Batch, mean: bool = False,
                       forward: Forward | None = None) -> torch.Tensor:
    """[examples, max_cands] fp32 sum (or mean) of candidate-token log-probs; -inf where no candidate.

    ``forward`` computes the decoder's hidden states (None: :func:`decoder_states`); its output is
    read once, here, before anything else runs it again (a graph's static output).
    """
    hidden = decoder_states(model, batch) if forward is None else forward(batch)
    h = hidden[batch.rows, batch.cols]
    logp = F.log_softmax(model.get_output_embeddings()(h).float(), dim=-1)
    tok_lp = logp[batch.query, batch.target]
    n_ex = batch.gold.numel()
    flat = torch.zeros(n_ex * batch.max_cands, dtype=torch.float32, device=tok_lp.device)
    flat.index_add_(0, batch.owner, tok_lp)
    if mean:
        counts = torch.zeros_like(flat).index_add_(0, batch.owner, torch.ones_like(tok_lp))
        flat = flat / counts.clamp(min=1)
    scores = flat.view(n_ex, batch.max_cands)
    valid = torch.arange(batch.max_cands, device=scores.device)[None, :] < batch.num_cands[:, None]
    return scores.masked_fill(~valid, float("-inf"))


def loss_from_scores(scores: torch.Tensor, batch: Batch, kind: str) -> float:
    """Training loss: ``ce`` = cross-entropy over candidates; ``lm`` = NLL of the gold candidate;
    ``acc`` = 1 − accuracy of the argmax candidate (not differentiable, but ZO only needs values).
    """
    if kind == "ce":
        return F.cross_entropy(scores, batch.gold).item()
    if kind == "lm":
        return (-scores.gather(1, batch.gold[:, None])).mean().item()
    if kind == "acc":
        return 1.0 - (scores.argmax(1) == batch.gold).sum().item() / batch.gold.numel()
    raise SparseZOError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def batch_loss(model: nn.Module, batch: Batch, kind: str = "ce", forward: Forward | None = None) -> float:
    """The scalar a ZO step compares between θ+εz and θ−εz (``forward``: see :func:`candidate_logprobs`).

    ``lm`` uses the mean log-prob per gold token, so long answers do not dominate.
    """
    return loss_from_scores(candidate_logprobs(model, batch, mean=(kind == "lm"), forward=forward), batch, kind)


def _length(e: Encoded) -> int:
    """The sort key of bucketing: prompt plus longest candidate (a row is at most this long; kept as
    it was when bucketing was introduced, so the batches, hence every score, stay the same)."""
    return len(e.prompt) + max(map(len, e.cands))


def eval_chunks(encoded: list[Encoded], batch_size: int, bucketed: bool = True) -> list[list[int]]:
    """Example indices of each evaluation forward: consecutive runs of the examples sorted by
    length (``bucketed``), so a forward pads its rows to a similar length, or in input order."""
    order = sorted(range(len(encoded)), key=lambda i: _length(encoded[i])) if bucketed else list(range(len(encoded)))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


# What one more forward costs, in token positions of work: a step split into micro-batches pays it once per
# micro-batch, so splitting pays only where it saves more padding than this. Measured on SmolLM2-135M, fp32,
# one thread of the 2-core CPU (loaded): 1 x 8 tokens 0.44 s, 1 x 24 0.72 s, 4 x 24 1.7 s, 16 x 24 3.8 s,
# i.e. ~0.3 s a forward + ~13 ms a token position.
FORWARD_OVERHEAD_TOKENS = 24


def _rows_and_width(encoded: list[Encoded]) -> tuple[list[int], list[int]]:
    """Per example: rows it adds to a forward and their padded width (``make_batch``'s layout)."""
    if all(len(c) == 1 for e in encoded for c in e.cands):
        return [1] * len(encoded), [len(e.prompt) for e in encoded]
    return [len(e.cands) for e in encoded], [len(e.prompt) + max(map(len, e.cands)) - 1 for e in encoded]


def micro_batch_chunks(encoded: list[Encoded], overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[list[int]]:
    """Positions in ``encoded`` of each micro-batch of one training step: the examples sorted by
    length (ties in input order), cut into consecutive runs that minimise the token positions
    computed — rows × padded width, plus ``overhead`` per forward — exactly (dynamic programme over the
    cut points). Every example is in exactly one micro-batch; the cut depends only on the lengths."""
    rows, width = _rows_and_width(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (width[i], i))
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        n_rows = 0
        for i in range(j - 1, -1, -1):  # micro-batch order[i:j], its widest row last
            n_rows += rows[order[i]]
            cost = best[i] + overhead + n_rows * width[order[j - 1]]
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], len(order)
    while j:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def micro_batches(encoded: list[Encoded], pad_id: int, device="cpu", bucketed: bool = True) -> list[Batch]:
    """One training step's examples as length-bucketed micro-batches (one batch when not ``bucketed``)."""
    chunks = micro_batch_chunks(encoded) if bucketed else [list(range(len(encoded)))]
    return [make_batch([encoded[i] for i in c], pad_id, device=device) for c in chunks]


def micro_batch_loss(model: nn.Module, batches: list[Batch], kind: str = "ce", forward: Forward | None = None) -> float:
    """The mean loss over all examples of ``batches``: each micro-batch's mean weighted by its examples, so it
    equals :func:`batch_loss` of the whole step in one batch up to float summation order."""
    if len(batches) == 1:  # exactly batch_loss (× n / n may move the last bit)
        return batch_loss(model, batches[0], kind, forward)
    n = sum(b.gold.numel() for b in batches)
    return sum(batch_loss(model, b, kind, forward) * b.gold.numel() for b in batches) / n


def padding_fraction_of(batches: list[Batch]) -> float:
    """Share of the token positions of ``batches`` that are padding."""
    cells = sum(b.attention_mask.numel() for b in batches)
    return 1 - sum(int(b.attention_mask.sum()) for b in batches) / cells


def padding_fraction(tokenizer, examples: list[Example], batch_size: int = 32, bucketed: bool = True) -> float:
    """Share of the token positions of the evaluation forwards that are padding (no model needed)."""
    enc = encode(tokenizer, examples)
    cells = real = 0
    for chunk in eval_chunks(enc, batch_size, bucketed):
        b = make_batch([enc[i] for i in chunk], tokenizer.pad_token_id or 0)
        cells += b.attention_mask.numel()
        real += int(b.attention_mask.sum())
    return 1 - real / cells


def candidate_scores(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32,
                     mean: bool = False, progress=None, bucketed: bool = True) -> torch.Tensor:
    """[examples, most candidates] fp32 summed (or mean) candidate log-probs, in input order; -inf
    where an example has fewer candidates.

    Examples are batched in order of length (``bucketed``), so padding (wasted compute) stays
    small: 2-15% of the positions on the test splits at 32 a batch (CB 40%, ReCoRD 31%: too few
    examples to sort), against 26-61% in input order (``benchmarks/speed.py --parts padding``).
    Rows are scored independently (explicit position ids and attention masks), so the grouping
    changes no score.
    """
    device = next(model.parameters()).device
    enc = encode(tokenizer, examples)
    width = max((len(e.candidates) for e in examples), default=1)
    scores = torch.full((len(enc), width), float("-inf"), dtype=torch.float32)
    for chunk in eval_chunks(enc, batch_size, bucketed):
        b = make_batch([enc[i] for i in chunk], tokenizer.pad_token_id, device=device)
        s = candidate_logprobs(model, b, mean=mean).cpu()
        scores[chunk, : s.shape[1]] = s
        if progress is not None:
            progress.update(len(chunk))
    return scores


def predict(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32, mean: bool = False,
            progress=None, bucketed: bool = True) -> torch.Tensor:
    """Predicted candidate index per example (argmax of :func:`candidate_scores`), in input order."""
    return candidate_scores(model, tokenizer, examples, batch_size, mean, progress, bucketed).argmax(1)


def dev_loss(scores: torch.Tensor, gold: list[int]) -> tuple[float, float]:
    """(mean, standard error) of the cross-entropy over the candidates of :func:`candidate_scores`: the
    ``ce`` training loss on a split, free once the split is scored. Dev selection breaks accuracy ties
    on it at the ceiling, where it still shows learning that accuracy cannot (a split already at 100%)."""
    per = F.cross_entropy(scores, torch.tensor(gold), reduction="none")
    return per.mean().item(), per.std().item() / len(gold) ** 0.5 if len(gold) > 1 else 0.0


def accuracy(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32, mean: bool = False,
             progress=None) -> float:
    preds = predict(model, tokenizer, examples, batch_size, mean, progress)
    gold = torch.tensor([e.gold for e in examples])
    return (preds == gold).sum().item() / len(examples)
