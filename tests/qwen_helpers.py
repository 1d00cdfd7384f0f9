"""A tiny Qwen2 for tests: the second family's traits at a size that runs in milliseconds.

What makes Qwen2.5 differ from the default (Llama) model, kept here: q/k/v projections with biases,
grouped-query attention with a 64-wide head (14 heads over 2 KV heads there, 3 over 1 here), a
byte-level BPE vocabulary (what GGUF export writes as llama.cpp's ``gpt2``), and tied or untied
embeddings. The widths keep Qwen2.5's int4 group arithmetic: 896 and 4,864 are multiples of 64 but
896 = 7·128 has an odd number of 128-groups and 4,864 = 76·64; here 192 = 3·64 and 320 = 5·64 are
multiples of the default int4 group (64) but not of 128, so an off-by-one in group counting shows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gguf_helpers import bpe_tokenizer

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 192, 320, 3, 1


def tiny_qwen2(tied: bool = True, seed: int = 0, intermediate: int = INTERMEDIATE):
    """A random 2-layer Qwen2 over :func:`bpe_tokenizer`'s vocabulary, biases and norms off their init values."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(bpe_tokenizer()), hidden_size=HIDDEN, intermediate_size=intermediate,
                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=256, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zero biases and unit norms would hide a dropped tensor
                p.add_(0.05 * torch.randn_like(p))
    model.requires_grad_(False)
    return model


def save_tiny_qwen2(path: Path, tied: bool = True, seed: int = 0, intermediate: int = INTERMEDIATE) -> Path:
    """A loadable Hugging Face folder (fp32 model + byte-level BPE tokenizer) for CLI tests."""
    tiny_qwen2(tied, seed, intermediate).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path
