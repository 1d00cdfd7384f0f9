"""``--model FILE.gguf``: convert a GGUF checkpoint once into a cached Hugging Face folder.

On-device users hold their models as GGUF files (llama.cpp, Ollama, LM Studio). transformers'
own GGUF loader dequantizes the whole model to fp32 first (28 GB for a 7B model), so sparsezo
converts streaming instead: one tensor is dequantized (``gguf.quants.dequantize``), un-permuted
where llama.cpp permuted it, cast and handed to a :class:`~sparsezo.model.shards.ShardWriter`, which
holds at most one output shard. The config and tokenizer come from transformers' GGUF metadata
support (the same mapping ``from_pretrained(gguf_file=...)`` uses), so the folder loads exactly as
transformers would load the file.

The result lives in ``$SPARSEZO_HOME/gguf/<sha256 of the file>-<dtype>/``: keyed by content, not
by path, so a renamed or copied file reuses it and an edited file never does. It also keeps the
file's GGUF metadata (``gguf_metadata.json``: tokenizer, chat template, names) so that
``sparsezo export --format gguf`` can write the fine-tune back with the very same tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SparseZOError
from ..io import atomic_dir, write_json
from .paths import sparsezo_home
from .shards import ShardWriter

log = logging.getLogger(__name__)

METADATA_FILE = "gguf_metadata.json"
SOURCE_FILE = "gguf_source.json"
# Processors of transformers that merge several GGUF tensors into one (MoE experts) or are not causal
# LMs: they need the whole model at once, which a streaming converter cannot give them.
_NOT_STREAMABLE = {"qwen2moe", "qwen3moe", "gpt-oss", "gpt_oss", "minimax-m2", "t5", "t5encoder"}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file ``path`` names: itself when it ends in ``.gguf``, or the single ``.gguf`` of a folder
    that has no ``config.json``; ``None`` when ``path`` is no GGUF input at all."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise SparseZOError(f"--model {p}: no such GGUF file; check the path")
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
        if len(files) > 1:
            raise SparseZOError(f"--model {p} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:3])}"
                                f"{', ...' if len(files) > 3 else ''}); pass --model FILE.gguf to choose one")
        if files:
            return files[0]
    return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks (a 7B GGUF never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_folder(sha256: str, dtype: torch.dtype) -> Path:
    """Where the conversion of the GGUF file with this hash, stored in ``dtype``, is cached."""
    return sparsezo_home() / "gguf" / f"{sha256}-{_DTYPE_NAMES[dtype]}"


def converted_folder(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The cached Hugging Face folder of a GGUF file, converting it on first use.

    Hashing costs one read of the file (about a second per GB); the conversion itself runs once
    per file content and dtype.
    """
    src = gguf_file(path)
    if src is None:
        raise SparseZOError(f"{path} is not a GGUF file nor a folder holding one; pass --model FILE.gguf")
    digest = file_sha256(src)
    target = cache_folder(digest, dtype)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into %s (once; streaming, one tensor at a time)", src, target)
    convert_gguf(src, target, dtype, sha256=digest)
    return target


def _parsed_metadata(src: Path) -> dict[str, Any]:
    """transformers' reading of the file's metadata (config and tokenizer fields), as one clear error when it fails."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(src), return_tensors=False)
    except ValueError as e:
        if "not supported" in str(e):
            raise SparseZOError(f"--model {src}: {e} (transformers {_tf_version()} maps the GGUF architectures "
                                f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the model to a "
                                "Hugging Face folder another way and pass that folder") from e
        raise SparseZOError(f"--model {src} is not a readable GGUF file ({e}); re-download it") from e
    except (OSError, KeyError, IndexError) as e:
        raise SparseZOError(f"--model {src} is not a readable GGUF file ({type(e).__name__}: {e}); "
                            "re-download it") from e


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def read_metadata(reader) -> dict[str, dict[str, Any]]:
    """Every key-value field of a GGUF file (not the per-file counters) as JSON: value and GGUF value types."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = {"types": [int(t) for t in field.types], "value": field.contents()}
    return out


@torch.no_grad()
def convert_gguf(src: str | os.PathLike, target: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 sha256: str | None = None) -> int:
    """Convert the GGUF file ``src`` into a safetensors Hugging Face folder ``target`` (atomically).

    Streaming: one tensor is dequantized to fp32 (numpy), fixed up by transformers' tensor processor
    for the architecture (llama.cpp's Q/K row permutation for Llama, Gemma's norm offset), cast to
    ``dtype`` and written to a shard; the fp32 model never exists whole. Returns the weight bytes.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    src, target = Path(src), Path(target)
    parsed = _parsed_metadata(src)
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    if arch in _NOT_STREAMABLE:
        raise SparseZOError(f"--model {src}: GGUF architecture {arch!r} (mixture-of-experts or encoder-decoder) "
                            "is not supported by sparsezo's streaming converter; sparsezo fine-tunes dense causal "
                            "LMs (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, ...)")
    try:
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        key_length = reader.fields.get(f"{arch}.attention.key_length")
        if key_length is not None and hasattr(config, "head_dim"):  # transformers maps it for some archs only
            config.head_dim = int(key_length.contents())  # (Qwen3 otherwise takes its config's default, 128)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise SparseZOError(f"--model {src}: GGUF architecture {arch!r} does not load as a causal LM in "
                            f"transformers {_tf_version()} ({str(e).splitlines()[0]}); sparsezo fine-tunes dense "
                            "causal LMs (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, ...)") from e
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}  # tied weights once, as saved
    shapes.update({n: tuple(b.shape) for n, b in skeleton.named_buffers() if _persistent(skeleton, n)})
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (ValueError, KeyError, OSError) as e:
        raise SparseZOError(f"--model {src}: its tokenizer metadata does not convert ({str(e).splitlines()[0]}); "
                            "the file lacks tokenizer.ggml.* fields or uses a tokenizer transformers cannot read") from e
    written: set[str] = set()
    with atomic_dir(target, overwrite=True) as tmp:
        writer = ShardWriter(tmp)
        for t in reader.tensors:
            weights = dequantize(t.data, t.tensor_type)
            result = processor.process(weights=weights, name=t.name, tensor_key_mapping=name_map,
                                       parsed_parameters=parsed)
            name = name_map.get(result.name)
            if name is None or name not in shapes:
                log.debug("GGUF tensor %s has no place in %s; skipped", t.name, type(skeleton).__name__)
                continue
            tensor = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))
            if tuple(tensor.shape) != shapes[name]:
                raise SparseZOError(f"--model {src}: tensor {t.name} has shape {list(tensor.shape)}, the "
                                    f"{config.model_type} config expects {list(shapes[name])} for {name}; the file is "
                                    "inconsistent")
            writer.add(name, tensor.to(dtype))
            written.add(name)
        missing = sorted(set(shapes) - written)
        if missing:
            raise SparseZOError(f"--model {src} lacks the weights {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                                f"of a {config.model_type} model; the file is incomplete or of another layout")
        total = writer.close()
        if hasattr(config, "quantization_config"):  # the weights are plain floats now
            del config.quantization_config
        config.dtype = dtype
        config.architectures = [type(skeleton).__name__]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (Path(tmp) / METADATA_FILE).write_text(json.dumps(read_metadata(reader)) + "\n")
        write_json(Path(tmp) / SOURCE_FILE, {"gguf": str(src.resolve()), "sha256": sha256 or file_sha256(src),
                                             "architecture": arch, "dtype": _DTYPE_NAMES[dtype]})
    return total


def _persistent(model: torch.nn.Module, name: str) -> bool:
    mname, _, bname = name.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    return bname not in module._non_persistent_buffers_set


def source_metadata(folder: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The GGUF metadata a converted folder kept (``None`` for a folder that did not come from GGUF)."""
    p = Path(folder) / METADATA_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SparseZOError(f"{p} is not valid JSON ({e}); remove the folder {folder} to convert again") from e
