"""Tiny GGUF files for tests, written with gguf.GGUFWriter the way llama.cpp's converter writes a Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from helpers import WORDS, sentences
from sparsezo.testing import tiny_llama


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) trained on the test sentences: what llama.cpp calls 'gpt2'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [s for _, s in sentences(300, 0)] + [" ".join(WORDS)] * 5
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def bpe_model(seed: int = 0):
    """A tiny Llama whose vocabulary is :func:`bpe_tokenizer`'s."""
    return tiny_llama(seed=seed, vocab_size=len(bpe_tokenizer()), hidden=32, layers=2)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer, qtypes: dict[str, str] | None = None, arch: str = "llama") -> Path:
    """``model`` as a GGUF file; ``qtypes`` maps a substring of the GGUF tensor name to F32, F16 or Q8_0
    (first match wins; default F32). Q/K rows are permuted as llama.cpp does for its rope layout."""
    import gguf

    from sparsezo.export.gguf import _add_hf_tokenizer

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    _add_hf_tokenizer(w, tokenizer)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        base, _, suffix = name.rpartition(".")
        gname = f"{names.get_name(base)}.{suffix}"
        kind = next((q for k, q in (qtypes or {}).items() if k in gname), "F32") if a.ndim == 2 else "F32"
        if kind == "F32":
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        elif kind == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` stored as GGML type ``kind`` and read back (what a reader of the file sees)."""
    import gguf

    a = t.float().numpy()
    if kind == "F32" or a.ndim < 2:
        return torch.from_numpy(a.copy())
    if kind == "F16":
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    qt = gguf.GGMLQuantizationType[kind]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).copy())
