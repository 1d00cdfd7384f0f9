"""Loading a causal LM for forward-only training, and building the model a command works on.

:func:`build_model` is the one place that decides which model is built for a base + mask +
``--quant``: every command and the Python API go through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from ..errors import SparseZOError
from ..masks import Mask
from ..quant.convert import load_quantized, load_quantized_folder, quantize_model, quantized_mask
from ..quant.layers import QUANT_TYPES, is_quantized_folder
from ..resources import check_fits
from .memory import resident_bytes
from .params import DTYPES
from .resolve import resolve_model_path

log = logging.getLogger(__name__)

MaskSource = Mask | Callable[[nn.Module, Any], Mask] | None


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

    if dtype not in DTYPES:
        raise SparseZOError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quant not in (None, *QUANT_TYPES):
        raise SparseZOError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    folder = resolve_model_path(path)
    need = resident_bytes(folder, dtype, quant if mask is not None else None, mask)  # reads headers only
    check_fits(need + reserve_bytes, f"loading {folder}" + (f" with --quant {quant}" if quant else ""),
               "use --quant nf4 (a 4-bit base) or lower --batch-size/--seq-len, or use a machine with more memory"
               if not quant else "lower --batch-size/--seq-len, or use a machine with more memory")
    try:
        if is_quantized_folder(folder):
            model = load_quantized_folder(folder)
        elif quant is not None and mask is not None:
            model = load_quantized(folder, mask, DTYPES[dtype], quant=quant)
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


def build_model(path: str | os.PathLike | None = None, dtype: str = "bfloat16", device: str = "cpu",
                quant: str | None = None, mask: MaskSource = None) -> tuple[nn.Module, Any, Mask | None]:
    """The model, tokenizer and mask for a base (``path``), a mask and a 4-bit ``quant`` (or None).

    ``mask`` is a :class:`Mask` (a mask file or a delta's mask), a function ``(model, tokenizer) ->
    Mask`` that computes one on the full-precision weights (a rule), or None (no trainable set).
    - A given mask with ``quant``: its linears are quantized while the checkpoint streams in (the
      full-precision model never exists whole).
    - A computed mask: computed on the full-precision model, which is then quantized in place.
    - No mask with ``quant``: every eligible linear becomes 4-bit with no exact entries.
    - A folder written by ``sparsezo quantize`` is loaded as it is and brings its own mask, used
      unless one is given (checking a given mask against the model is the caller's: train checks
      it, eval and merge check the delta when they apply it).
    """
    given = mask if isinstance(mask, Mask) else None
    # a plain 4-bit base needs no full-precision weights on the device: it loads on the host (bf16 shards stay
    # mmap views) and each linear is quantized onto the device in turn
    plain_4bit = quant is not None and mask is None
    model, tok = load_model(path, dtype, "cpu" if plain_4bit else device, quant=quant if mask is not None else None,
                            mask=given if quant else None)
    built_with = quantized_mask(model)
    if built_with is not None:  # a quantized folder, or the given mask's linears quantized while streaming
        if given is None and mask is not None:
            log.info("using the mask the quantized model was built with (%s)", built_with.rule)
        return model.to(device), tok, given or built_with
    chosen = given if given is not None or mask is None else mask(model, tok)
    if quant:
        quantize_model(model, chosen, quant=quant, device=device)
    return model.to(device), tok, chosen


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
