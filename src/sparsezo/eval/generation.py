"""Greedy answer generation for the generation tasks (SQuAD, DROP).

Prompts are batched in order of length and padded on the left with an explicit attention
mask, so every row's next token sits in the last column and batching does not change the
output (Hugging Face ``generate`` derives position ids from the mask). Decoding stops at the
first newline or EOS — the answer cue of the templates is followed by a one-line answer, and
without a stop rule a base model runs on into the next "Question:" — and each answer is the
generated text up to that newline, stripped.
"""

from __future__ import annotations

import torch
from torch import nn

from .truncation import report_truncation, truncate, truncation_side


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every vocabulary token whose text contains a newline (e.g. "\\n", "\\n\\n", ".\\n")."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = [i for i, t in enumerate(texts) if "\n" in t]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def clean_answer(text: str) -> str:
    """The stop rule on text: everything before the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 50, batch_size: int = 8,
             max_length: int = 1024, stop_ids: list[int] | None = None, progress=None) -> list[str]:
    """Greedy answers (stop rule applied) for ``prompts``, in their order.

    Prompts longer than ``max_length - max_new_tokens`` tokens are cut on the tokenizer's
    :func:`~sparsezo.eval.truncation.truncation_side` (default left, keeping the question and the
    answer cue), and the cut is reported. ``stop_ids`` defaults to :func:`stop_token_ids`.
    """
    device = next(model.parameters()).device
    stop = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
    room = max_length - max_new_tokens
    side, enc, cut = truncation_side(tokenizer), [], []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if len(ids) > room:
            cut.append(len(ids) - room)
            ids = truncate(ids, room, side)
        enc.append(ids)
    if cut:
        report_truncation(tokenizer, len(cut), len(prompts), max(cut), room, side)
    pad = tokenizer.pad_token_id
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [""] * len(enc)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(enc[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, width - len(enc[i]) :] = torch.tensor(enc[i])
            attn[r, width - len(enc[i]) :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop or None, pad_token_id=pad)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            out[i] = clean_answer(text)
        if progress is not None:
            progress.update(len(chunk))
    return out
