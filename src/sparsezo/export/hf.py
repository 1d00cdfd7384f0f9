"""Merge a delta into its base and export a plain Hugging Face folder that ``transformers`` loads.

The export is written tensor by tensor into size-bounded shards, so merging a 7B fine-tune
needs the (mmap'ed or 4-bit) base plus one shard of memory, never a dense copy of the model:

- a delta passed to :func:`save_merged` is written into each weight as that weight is emitted
  (a cast copy), so the base model is never modified — applying a delta in place into mmap'ed
  bf16 weights would turn nearly every page of the checkpoint into anonymous memory;
- a fine-tune trained over a 4-bit base is exported with the weights it was trained against:
  each 4-bit layer is emitted as its dequantized weight with the trained entries written in,
  so the export computes exactly what sparsezo computed in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..io import atomic_dir
from ..quant import QUANT_LAYERS
from ..model.shards import SHARD_BYTES, ShardWriter


def merged_tensors(model: nn.Module, delta=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's state as a plain dense checkpoint, delta written in, in state_dict order."""
    values = {}
    if delta is not None:
        delta.mask.check_model(model, "delta")  # names, shapes, fingerprint: before anything is written
        values = {n: v.reshape(-1) for n, v in delta.values.items()}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, QUANT_LAYERS):
            w = m.dequantized()
            if prefix + "weight" in values:
                w.view(-1).index_copy_(0, m.idx, values[prefix + "weight"].to(w.dtype))
            yield prefix + "weight", w
            if m.bias is not None:
                yield prefix + "bias", m.bias.detach()
            continue
        tensors = list(m._parameters.items()) + [(n, b) for n, b in m._buffers.items()
                                                  if n not in m._non_persistent_buffers_set]
        for name, t in tensors:
            if t is None or t.data_ptr() in seen:  # tied weights are stored once, re-tied on load
                continue
            seen.add(t.data_ptr())
            t = t.detach()
            if prefix + name in values:
                idx = delta.mask.indices[prefix + name]
                t = t.clone()
                flat = t.view(-1)
                if idx is None:
                    flat.copy_(values[prefix + name].to(t.dtype))
                else:
                    flat.index_copy_(0, idx.to(flat.device), values[prefix + name].to(t.dtype))
            yield prefix + name, t


@torch.no_grad()
def save_merged(model: nn.Module, tokenizer, out: str | os.PathLike, delta=None,
                shard_bytes: int = SHARD_BYTES) -> int:
    """Write ``model`` (+ ``delta``, or with a delta already applied) as a sharded safetensors HF folder,
    config and tokenizer, atomically; 4-bit layers are dequantized on the way. Returns the weight bytes."""
    n = len(model.state_dict())
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        for name, t in tqdm(merged_tensors(model, delta), total=n, desc="merge", unit="tensor", leave=False):
            writer.add(name, t)
        total = writer.close()
        config = model.config
        config.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return total
