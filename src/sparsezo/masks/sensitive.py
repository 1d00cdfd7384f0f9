"""``sensitive`` (SensZOQ): the weights with the largest diagonal Fisher score.

Fisher ≈ sum over calibration micro-batches of the squared gradient of the causal-LM loss.
The calibration text is pre-training-like (WikiText-2 by default) for ``sensitive``, or the
task's own training text for ``sensitive-task``; the mask is computed once and shipped.
Only eligible tensors get gradients, and their squared gradients are accumulated in fp32.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from ..errors import SparseZOError
from .base import MaskContext, select_top


def calibration_batches(tokenizer, texts: list[str], calib_tokens: int, seq_len: int) -> torch.Tensor:
    """Concatenate the texts, tokenize, and cut the first ``calib_tokens`` tokens into rows of ``seq_len``."""
    joined = "\n\n".join(t for t in texts if t.strip())
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n_rows = min(len(ids) // seq_len, max(1, calib_tokens // seq_len))
    if n_rows == 0:
        raise SparseZOError(
            f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "give a longer --calib file or a smaller --seq-len"
        )
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


def fisher_scores(ctx: MaskContext) -> dict[str, torch.Tensor]:
    """Accumulate squared LM-loss gradients of the eligible tensors over calibration micro-batches."""
    if ctx.tokenizer is None or not ctx.texts:
        raise SparseZOError("the sensitive rule needs calibration text; pass --calib FILE (plain text or JSONL)")
    rows = calibration_batches(ctx.tokenizer, ctx.texts, ctx.calib_tokens, ctx.seq_len)
    model, params = ctx.model, ctx.params
    device = next(model.parameters()).device
    scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    was_training = model.training
    model.train(False)  # no dropout: the score must not depend on dropout noise
    for p in params.values():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, rows.shape[0], ctx.micro_batch), desc="fisher", unit="batch", leave=False):
                batch = rows[start : start + ctx.micro_batch].to(device)
                loss = model(input_ids=batch, labels=batch).loss
                grads = torch.autograd.grad(loss, list(params.values()))
                for s, g in zip(scores.values(), grads):
                    s.add_(g.float().square())
    finally:
        for p in params.values():
            p.requires_grad_(False)
        model.train(was_training)
    ctx.info.update(calib_rows=rows.shape[0], calib_tokens_used=rows.numel(), seq_len=ctx.seq_len)
    ctx.stats["fisher_seconds"] = round(time.perf_counter() - t0, 2)
    return scores


def compute(ctx: MaskContext, density: float) -> dict[str, torch.Tensor]:
    from .analysis import fisher_mass

    scores = fisher_scores(ctx)
    ctx.stats["fisher_mass"] = fisher_mass(scores)
    return select_top(scores, density, ctx.scope)


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
    return texts
