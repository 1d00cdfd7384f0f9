"""Miniature models for tests and examples (no files, no network)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2, dtype=torch.float32):
    """A randomly initialised miniature Llama for tests and examples (no files, no network)."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # buffers (rotary frequencies) stay fp32, as from_pretrained keeps them
        p.data = p.data.to(dtype)
    model.requires_grad_(False)
    return model
