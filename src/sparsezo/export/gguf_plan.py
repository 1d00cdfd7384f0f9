"""Per-tensor storage types for a 4-bit GGUF export that keeps the fine-tune (``--type q4_0+q8_0``).

A sparse fine-tune moves a few weights by less than a 4-bit step: stored at 4 bits, most trained
entries round back to their old value and the fine-tune is gone (llama.cpp scored a SmolLM2 SST-2
fine-tune 0.530 at q4_0 against 0.675 at q8_0). The trained entries are concentrated — in the
default model's 0.1% sensitive mask, 50 of 210 tensors hold 73% of them — so storing only those
tensors at 8 bits keeps most of the fine-tune for a fraction of q8_0's bytes. GGUF gives each
tensor one type, so the plan is per tensor.

Which tensors: the densest in trained entries first (trained entries per weight, so each 8-bit
byte keeps the most trained entries), until they hold :data:`KEEP_SHARE` of all trained entries.
The token embedding of a tied-head model is also the output layer, which every logit goes through:
llama.cpp's own quantizer stores it at 6 bits or more in its 4-bit types, and so does this plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

KEEP_SHARE = 0.9  # share of the trained entries stored at the keep type
# --type → (GGML type of most 2-D weights, GGML type of the tensors that keep the fine-tune)
MIXED = {"q4_0+q8_0": ("Q4_0", "Q8_0"), "q4_1+q8_0": ("Q4_1", "Q8_0")}
OUTPUT = "output.weight"  # llama.cpp's name of the LM head
EMBEDDING = "token_embd.weight"  # the LM head too when the model has no output.weight (tied)


def keep_tensors(shapes: Mapping[str, tuple[int, ...]], trained: Mapping[str, int],
                 share: float = KEEP_SHARE) -> list[str]:
    """Names of the tensors to store at the keep type: by trained entries per weight, densest first (ties in
    ``shapes`` order), until they hold ``share`` of the trained entries of all 2-D tensors."""
    position = {n: i for i, n in enumerate(shapes)}
    candidates = [n for n in shapes if len(shapes[n]) == 2 and trained.get(n, 0) > 0]
    total = sum(trained[n] for n in candidates)
    order = sorted(candidates, key=lambda n: (-trained[n] / math.prod(shapes[n]), position[n]))
    kept, held = [], 0
    for name in order:
        if held >= share * total:
            break
        kept.append(name)
        held += trained[name]
    return kept


def head_tensor(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The tensor every logit is computed with: ``output.weight``, else the tied token embedding."""
    return OUTPUT if OUTPUT in shapes else EMBEDDING if EMBEDDING in shapes else None


def storage_plan(shapes: Mapping[str, tuple[int, ...]], trained: Mapping[str, int], kind: str) -> dict[str, str]:
    """GGML type name per tensor of the mixed ``kind`` (:data:`MIXED`); 1-D tensors are left to the writer."""
    bulk, keep = MIXED[kind]
    plan = {name: bulk for name, shape in shapes.items() if len(shape) == 2}
    for name in [*keep_tensors(shapes, trained), head_tensor(shapes)]:
        if name is not None:
            plan[name] = keep
    return plan
