"""``sensitive`` (SensZOQ): the weights with the largest diagonal Fisher score, in bounded memory.

Fisher ≈ sum over calibration micro-batches of the squared gradient of the causal-LM loss.
The calibration text is pre-training-like (WikiText-2 by default) for ``sensitive``, or the
task's own training text for ``sensitive-task``; the mask is computed once and shipped.

Why it is built this way: for a 7B model the fp32 scores alone are 26 GB and the bf16
gradients 13 GB, so nothing may exist for all tensors at once. Instead

- each gradient is squared into its score by a post-accumulate hook the moment backward
  produces it, and freed there (at most one tensor's gradient is alive);
- score buffers exist only for a *group* of tensors; when all groups' buffers do not fit the
  memory budget, the calibration data is run once per group (passes), and each finished group
  is handed to the streaming exact top-k (:mod:`.topk`) and freed. With a single calibration
  micro-batch no buffer is needed at all (the squared gradient *is* the score);
- the LM head and cross-entropy run over chunks of positions, each recomputed in backward
  (checkpointed), so B×T×V logits never exist whole;
- decoder layers are checkpointed when their saved activations would not fit.

The squared gradients, and so the mask, are the same as a computation holding everything in
memory (tested on small models). Only eligible tensors get gradients; scores are fp32.

Over a 4-bit base (NF4/int4 layers, :mod:`.quantized`) the eligible tensors are the 4-bit
layers' logical weights and the gradients are those w.r.t. their dequantized weights, each
recomputed in backward; everything else here is the same.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import unicodedata
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..errors import SparseZOError
from ..hints import setting
from ..resources import available_memory_bytes, gib
from .base import MaskContext
from .quantized import QuantWeight, recomputing
from .topk import TopK

log = logging.getLogger(__name__)

HEAD_CHUNK_BYTES = 64 * 2**20  # fp32 logits of one LM-head chunk
_RUNTIME_RESERVE = 512 * 2**20  # torch/transformers themselves, tokenizer, allocator slack


def calibration_batches(tokenizer, texts: list[str], calib_tokens: int, seq_len: int) -> torch.Tensor:
    """Concatenate the texts, tokenize, and cut the first ``calib_tokens`` tokens into rows of ``seq_len``."""
    joined = "\n\n".join(t for t in texts if t.strip())
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n_rows = min(len(ids) // seq_len, max(1, calib_tokens // seq_len))
    if n_rows == 0:
        raise SparseZOError(
            f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "give a longer --calib file or a smaller --calib-seq-len"
        )
    if len(ids) < calib_tokens:
        log.warning("warning: the calibration text has %d tokens, fewer than %s %d: the Fisher score uses "
                     "%d; give %s for the full budget", len(ids), setting("calib_tokens"), calib_tokens,
                     n_rows * seq_len, setting("calib"))
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


# ----------------------------------------------------------------------------- the loss
def _head_parts(model: nn.Module):
    """(decoder, head, softcap) for a chunked LM loss, or None when the model is not of that shape."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or decoder is model or head is None:
        return None
    return decoder, head, getattr(model.config, "final_logit_softcapping", None)


def _chunk_nll(head: nn.Module, softcap: float | None, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(parts, batch: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token NLL of ``batch`` (as ``model(input_ids, labels=input_ids).loss``), computed
    over chunks of ``chunk_tokens`` positions whose logits are recomputed in backward."""
    decoder, head, softcap = parts
    out = decoder(input_ids=batch, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = batch[:, 1:].reshape(-1)
    nll = functools.partial(checkpoint, _chunk_nll, use_reentrant=False) if h.requires_grad else _chunk_nll
    total = sum(nll(head, softcap, h[s : s + chunk_tokens], targets[s : s + chunk_tokens])
                for s in range(0, targets.numel(), chunk_tokens))
    return total / targets.numel()


def _loss_fn(model: nn.Module, sample: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The chunked loss when it reproduces the model's own loss on ``sample``; else the model's (unbounded)."""
    parts = _head_parts(model)
    plain = lambda b: model(input_ids=b, labels=b, use_cache=False).loss  # noqa: E731
    if parts is None:
        log.warning("this model's LM head cannot be chunked; the Fisher pass holds the whole logits tensor")
        return plain
    vocab = parts[1].weight.shape[0]
    chunk = max(1, HEAD_CHUNK_BYTES // (4 * vocab))
    with torch.no_grad():
        ref, got = plain(sample).float(), chunked_lm_loss(parts, sample, chunk).float()
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    if not torch.isfinite(ref) or abs(got - ref) > tol * max(1.0, abs(ref.item())):
        log.warning("chunked LM loss %.6f differs from the model's %.6f; the Fisher pass holds the whole logits "
                    "tensor instead", got.item(), ref.item())
        return plain
    return functools.partial(chunked_lm_loss, parts, chunk_tokens=chunk)


# ----------------------------------------------------------------------------- memory plan
def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The stack of decoder layers (the largest ModuleList of the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def activation_bytes(model: nn.Module, rows: int, seq_len: int, checkpointed: bool) -> int:
    """Rough upper bound of what backward saves for one micro-batch of ``rows`` × ``seq_len``."""
    cfg = model.config
    h = getattr(cfg, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    heads = getattr(cfg, "num_attention_heads", 1)
    layers = getattr(cfg, "num_hidden_layers", None) or len(_decoder_layers(model) or [1])
    elt = next(model.parameters()).element_size()
    tokens = rows * seq_len
    per_layer = tokens * (10 * h + 5 * inter) * elt + rows * heads * seq_len * seq_len * 4  # + attention probs
    head = 3 * HEAD_CHUNK_BYTES + tokens * h * 4
    if checkpointed:  # layer inputs only, plus one layer's recompute
        return layers * tokens * h * elt + per_layer + head
    return layers * per_layer + head


def _groups(sizes: dict[str, int], budget: int | None) -> list[list[str]]:
    """Consecutive tensors (model order) whose fp32 score buffers fit ``budget`` together."""
    if budget is None:
        return [list(sizes)]
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if groups[-1] and used + 4 * n > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += 4 * n
    return groups


def plan_passes(model: nn.Module, params: dict[str, nn.Parameter], rows: int, seq_len: int, micro_batch: int,
                pool_bytes: int, memory_limit: int | None = None, score_memory: int | None = None) -> dict:
    """How to fit the Fisher computation in memory: score groups (one calibration pass each) and
    whether decoder layers are checkpointed. Raises early when even one tensor cannot fit.

    ``memory_limit``: bytes it may use (default: what the model's device has left — the GPU's
    free memory for a CUDA model, else the machine's or cgroup's; ``--max-memory`` bounds that same
    device's memory); ``score_memory``: bytes for score buffers, overriding what the limit leaves.
    Score buffers, gradients, activations and the top-k pool all live on the model's device.
    """
    n_mb = math.ceil(rows / micro_batch)
    mb_rows = min(rows, micro_batch)
    sizes = {n: p.numel() for n, p in params.items()}
    largest = max(sizes.values())
    elt = next(model.parameters()).element_size()
    limit = memory_limit if memory_limit is not None else available_memory_bytes(next(model.parameters()).device)
    # one gradient (compute dtype) and its fp32 square alive at a time, the top-k pool, the runtime
    fixed = largest * (elt + 8) + pool_bytes + _RUNTIME_RESERVE
    act = activation_bytes(model, mb_rows, seq_len, checkpointed=False)
    ckpt = limit is not None and fixed + act + (4 * sum(sizes.values()) if n_mb > 1 else 0) > limit
    if ckpt:
        act = activation_bytes(model, mb_rows, seq_len, checkpointed=True)
    if n_mb == 1:
        budget = None  # one pass: the squared gradient of a single micro-batch is the score itself
    elif score_memory is not None:
        budget = score_memory
    else:
        budget = None if limit is None else int(0.9 * limit - fixed - act)  # 10%: allocator slack, estimate error
    need = fixed + act + (4 * largest if n_mb > 1 else 0)
    if limit is not None and need > limit:
        raise SparseZOError(
            f"the Fisher score of this model needs at least {gib(need)} of memory ({gib(act)} of activations for "
            f"{mb_rows} x {seq_len} tokens), but only {gib(limit)} is available; lower --seq-len, or --calib-tokens "
            f"to one micro-batch ({micro_batch * seq_len} tokens, no score buffers), or compute the mask on a bigger "
            "machine and ship the file")
    groups = _groups(sizes, budget)
    return {"groups": groups, "checkpoint": ckpt, "micro_batches": n_mb, "memory_limit": limit,
            "estimate_bytes": need if budget is None else fixed + act + 4 * max(sum(sizes[n] for n in g) for g in groups)}


# ----------------------------------------------------------------------------- the passes
class _CheckpointedLayers:
    """Within the block, each decoder layer recomputes its activations in backward."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.layers = list(_decoder_layers(model) or []) if enabled else []

    def __enter__(self):
        for layer in self.layers:
            layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer), use_reentrant=False)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


def _attach(p: nn.Parameter | QuantWeight, on_grad: Callable[[torch.Tensor], None]) -> Callable[[], None]:
    """Deliver each gradient of ``p`` to ``on_grad`` (and drop it) until the returned function is called."""
    if isinstance(p, QuantWeight):
        return p.attach(on_grad)

    def take(param: nn.Parameter) -> None:
        g, param.grad = param.grad, None
        on_grad(g)

    p.requires_grad_(True)
    handle = p.register_post_accumulate_grad_hook(take)

    def detach() -> None:
        handle.remove()
        p.requires_grad_(False)
        p.grad = None
    return detach


def squared_gradient_passes(model: nn.Module, params: dict[str, nn.Parameter | QuantWeight], rows: torch.Tensor,
                            micro_batch: int, plan: dict, sink: Callable[[str, torch.Tensor], None]) -> None:
    """Run the calibration micro-batches once per score group; hand each tensor's summed squared
    gradient (fp32, its shape) to ``sink`` as soon as it is final, then drop it."""
    device = next(model.parameters()).device
    quant = {n: p for n, p in params.items() if isinstance(p, QuantWeight)}
    with recomputing(model, quant):
        loss_fn = _loss_fn(model, rows[:1, : min(rows.shape[1], 32)].to(device))
    n_mb = plan["micro_batches"]
    # one tick per tensor gradient, as backward delivers them: a single large micro-batch (the demo's)
    # would otherwise hold the bar at 0/1, with no ETA, for its whole backward
    bar = tqdm(total=n_mb * sum(map(len, plan["groups"])), desc="fisher", unit="grad", leave=False)
    for group in plan["groups"]:
        buffers: dict[str, torch.Tensor] = {}
        done: set[str] = set()

        def hook(name: str, g: torch.Tensor) -> None:
            sq = g.float().square()
            del g
            bar.update(1)
            if n_mb == 1:
                sink(name, sq)
                done.add(name)
            elif name in buffers:
                buffers[name].add_(sq)
            else:
                buffers[name] = torch.zeros_like(sq).add_(sq)  # 0 + x, as an accumulation from zeros

        ticks = bar.n
        detach = [_attach(params[name], functools.partial(hook, name)) for name in group]
        try:
            with torch.enable_grad(), _CheckpointedLayers(model, plan["checkpoint"]), recomputing(model, quant):
                for start in range(0, rows.shape[0], micro_batch):
                    loss = loss_fn(rows[start : start + micro_batch].to(device))
                    loss.backward()
                    del loss
                    bar.update(ticks + len(group) * (start // micro_batch + 1) - bar.n)  # tensors with no gradient
        finally:
            for d in detach:
                d()
        for name in group:  # a tensor the loss does not depend on has a zero score
            if name not in done:
                sink(name, buffers.pop(name, None) if name in buffers else torch.zeros(params[name].shape, device=device))
    bar.close()


def _run(ctx: MaskContext, sink: Callable[[str, torch.Tensor], None], pool_bytes: int) -> None:
    """Hand every eligible tensor's Fisher score to ``sink`` (``pool_bytes``: what the sink keeps)."""
    if ctx.tokenizer is None or not ctx.texts:
        raise SparseZOError("the sensitive rule needs calibration text; pass --calib FILE (plain text or JSONL)")
    rows = calibration_batches(ctx.tokenizer, ctx.texts, ctx.calib_tokens, ctx.seq_len)
    model, params = ctx.model, ctx.params
    plan = plan_passes(model, params, rows.shape[0], rows.shape[1], ctx.micro_batch, pool_bytes, ctx.memory_limit,
                       ctx.score_memory)
    if len(plan["groups"]) > 1:
        log.info("Fisher scores in %d passes over the calibration data (score buffers for %s of weights at a time%s)",
                 len(plan["groups"]), gib(plan["estimate_bytes"]), ", checkpointed layers" if plan["checkpoint"] else "")
    was_training = model.training
    model.train(False)  # no dropout: the score must not depend on dropout noise
    t0 = time.perf_counter()
    try:
        squared_gradient_passes(model, params, rows, ctx.micro_batch, plan, sink)
    finally:
        model.train(was_training)
    ctx.info.update(calib_rows=rows.shape[0], calib_tokens_used=rows.numel(), seq_len=ctx.seq_len)
    ctx.stats.update(fisher_seconds=round(time.perf_counter() - t0, 2), fisher_passes=len(plan["groups"]),
                     fisher_checkpointed=plan["checkpoint"], memory_estimate_bytes=plan["estimate_bytes"])


def fisher_scores(ctx: MaskContext) -> dict[str, torch.Tensor]:
    """Every eligible tensor's Fisher score, held in memory (for analysis of small models)."""
    scores: dict[str, torch.Tensor] = {}
    _run(ctx, scores.__setitem__, sum(4 * p.numel() for p in ctx.params.values()))
    return {n: scores[n] for n in ctx.params}


def compute(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    from .analysis import DEFAULT_MASS_DENSITIES

    top = TopK({n: p.numel() for n, p in ctx.params.items()}, density, ctx.scope, DEFAULT_MASS_DENSITIES)
    _run(ctx, top.offer, 12 * 3 * top.capacity)  # pool + candidates waiting + a merge
    ctx.stats["fisher_mass"] = top.mass()
    return top.indices()


def read_texts(path) -> list[str]:
    """Calibration text from a plain-text file (one document per blank-line block) or JSONL ({"text": ...})."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise SparseZOError(f"calibration file {path} does not exist; pass --calib to a text or JSONL file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SparseZOError(f"cannot read calibration file {path}: {e}") from e
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SparseZOError(f"calibration file {path} line {n}: expected a JSON object with a 'text' field") from e
    else:
        texts = [raw]
    if not any(t.strip() for t in texts):
        raise SparseZOError(f"calibration file {path} is empty; give a file with text in it")
    check_text(texts, path)
    return texts


MAX_NON_TEXT = 0.01  # share of control/replacement characters above which a file is not text


def check_text(texts: list[str], path) -> None:
    """Refuse binary data that happens to decode as UTF-8 (e.g. bytes < 0x80 are all valid UTF-8).

    Natural text has essentially no control characters besides whitespace, and no U+FFFD (what a
    lossy decoder left behind). A Fisher score computed on garbage would select weights that carry
    no language signal, silently, so more than ``MAX_NON_TEXT`` of such characters is an error.
    """
    total = bad = 0
    for t in texts:
        total += len(t)
        bad += sum(1 for c in t if c == "\ufffd" or (unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v"))
    if total and bad / total > MAX_NON_TEXT:
        raise SparseZOError(f"calibration file {path} does not look like text: {bad / total:.1%} of its characters "
                            f"are control or replacement characters (at most {MAX_NON_TEXT:.0%} allowed); "
                            "pass --calib a UTF-8 text or JSONL file")
