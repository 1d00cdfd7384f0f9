"""4-bit frozen base: quantize the eligible linears of a model around a mask, save and load it.

Three ways to get a quantized model, all giving the same layers:
- :func:`quantize_model`: in place, layer by layer, on a loaded model (when the mask was just
  computed on the full-precision weights);
- :func:`load_quantized`: streaming from a Hugging Face safetensors folder, one tensor at a time,
  so the full-precision model never exists whole in memory (peak ≈ quantized model + one tensor);
- :func:`load_quantized_folder`: a folder written by :func:`save_quantized` or
  :func:`quantize_folder` (no re-quantization).

:func:`quantize_folder` writes a quantized folder straight from a checkpoint, tensor by tensor,
without ever holding the model (peak ≈ one output shard + one tensor): what ``sparsezo quantize``
does with a mask file. Folders are sharded like Hugging Face checkpoints.

Two 4-bit formats share every function here (``quant=``): ``nf4`` (:class:`NF4Linear`,
bitsandbytes, CUDA and CPU) and ``int4`` (:class:`Int4Linear`, PyTorch's int4 kernels, fast
on CPU). The folder's ``sparsezo_quant.json`` names which one it holds.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..errors import SparseZOError
from ..io import atomic_dir
from ..masks import Mask
from ..model.params import eligible_parameters
from ..model.shards import SHARD_BYTES, ShardWriter, iter_tensors, tensor_shapes
from .int4 import GROUP
from .layers import FORMATS, QUANT_FILE, QUANT_LAYERS, from_linear, new_layer, quant_kind, skeleton

log = logging.getLogger(__name__)

def _module_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise SparseZOError(f"--quant applies to linear weights; the mask names {weight_name}, which is not one")
    return weight_name[: -len(".weight")]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, mask: Mask | None = None, nested: bool = True, quant: str = "nf4",
                   device: str | torch.device | None = None) -> nn.Module:
    """Replace every linear the mask covers by a 4-bit layer (``quant``) keeping the masked entries exact.

    Without a mask, every eligible linear is quantized with no exact entries (a plain 4-bit base).
    ``device``: where the 4-bit layers are built (default: where each weight is). A model loaded on
    the host is quantized onto a GPU one layer at a time, so its dense linears never sit on the GPU
    together (a 7B base in bf16 needs 13.5 GB; in 4 bits, 3.7 GB); the caller moves the rest.
    """
    if mask is None:
        params = eligible_parameters(model)
        mask = Mask({n: torch.empty(0, dtype=torch.int64) for n in params}, {n: tuple(p.shape) for n, p in params.items()},
                    {"rule": "none", "density": 0.0})
    if mask.is_full:
        raise SparseZOError("full ZO trains every weight, so nothing can be quantized; use a sparse mask with --quant")
    for wname, idx in mask.indices.items():
        lin = model.get_submodule(_module_name(wname))
        if not isinstance(lin, nn.Linear):
            raise SparseZOError(f"{wname} belongs to a {type(lin).__name__}, not a Linear layer; it cannot be quantized")
        weight, bias = (lin.weight, lin.bias) if device is None else (lin.weight.to(device), _to(lin.bias, device))
        _swap(model, _module_name(wname), from_linear(quant, weight, bias, idx, lin.weight.dtype, nested))
    model.sparsezo_quant = {"mask": mask.meta}
    return model


def _to(t: torch.Tensor | None, device: str | torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _shells(model: nn.Module, mask: Mask, dtype: torch.dtype, nested: bool, has_bias: set[str],
            quant: str) -> dict[str, nn.Module]:
    shells = {}
    for wname, idx in mask.indices.items():
        if idx is None:
            raise SparseZOError("full ZO trains every weight, so nothing can be quantized; use a sparse mask with --quant")
        mname = _module_name(wname)
        out_f, in_f = mask.shapes[wname]
        shells[wname] = new_layer(quant, in_f, out_f, dtype, idx.numel(), f"{mname}.bias" in has_bias, nested)
        shells[wname].idx.copy_(idx)
        _swap(model, mname, shells[wname])
    return shells


def _finish(model: nn.Module, folder: Path) -> nn.Module:
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise SparseZOError(f"the checkpoint in {folder} lacks {missing[:3]} ({len(missing)} tensors); it is incomplete")
    model.eval().requires_grad_(False)
    model.name_or_path = str(folder)
    return model


def _set_dense(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mname, _, pname = key.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(value, requires_grad=False)
    elif pname in module._buffers:
        module._buffers[pname] = value
    else:
        raise SparseZOError(f"checkpoint tensor {key} matches no parameter of the model; is it the right folder?")


def _known(model: nn.Module, key: str, folder: Path) -> bool:
    """Whether a checkpoint tensor has a place in the model (parameters and buffers, the rotary
    ``inv_freq`` old checkpoints carry included); any other tensor means another model's checkpoint."""
    mname, _, pname = key.rpartition(".")
    try:
        module = model.get_submodule(mname) if mname else model
    except AttributeError:
        module = None
    if module is None or (pname not in module._parameters and pname not in module._buffers):
        raise SparseZOError(f"the checkpoint in {folder} holds {key}, which has no place in the model its config.json "
                            "describes; it belongs to another model: point --model at the folder the weights came from")
    return True


@torch.no_grad()
def load_quantized(folder: str | os.PathLike, mask: Mask, dtype: torch.dtype = torch.bfloat16,
                   nested: bool = True, quant: str = "nf4") -> nn.Module:
    """Load an HF safetensors checkpoint, quantizing the mask's linears while streaming.

    Each tensor is read, cast or quantized, and dropped before the next one is read.
    """
    folder = Path(folder)
    keys = set(tensor_shapes(folder))
    model = skeleton(folder, dtype)
    shells = _shells(model, mask, dtype, nested, keys, quant)
    for key, t in tqdm(iter_tensors(folder), total=len(keys), desc="load+quantize", unit="tensor", leave=False):
        if key in shells:
            shells[key].quantize_(t, None)
        elif key.endswith(".bias") and f"{key[:-5]}.weight" in shells:
            shells[f"{key[:-5]}.weight"].bias.data.copy_(t.to(dtype))
        elif _known(model, key, folder):
            _set_dense(model, key, t.to(dtype))
        del t
    model.sparsezo_quant = {"mask": mask.meta}
    return _finish(model, folder)


def save_quantized(model: nn.Module, tokenizer, folder: str | os.PathLike, mask: Mask) -> None:
    """Write config, tokenizer, quantized weights and the quantization record (atomically)."""
    seen, tensors = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # tied weights are stored once and re-tied on load
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.contiguous()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
    first = next(iter(layers.values()))
    with atomic_dir(folder) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        writer = ShardWriter(tmp)
        for k, v in tensors.items():
            writer.add(k, v)
        writer.close()
        _write_record(tmp, {n: _layer_info(m, m.bias is not None) for n, m in layers.items()}, first.dtype,
                      getattr(first, "nested", False), mask, quant_kind(first))


def _layer_info(m: nn.Module, bias: bool) -> dict:
    return {"shape": [m.out_features, m.in_features], "k": m.idx.numel(), "bias": bias}


def _write_record(folder: Path, layers: dict[str, dict], dtype: torch.dtype, nested: bool, mask: Mask,
                  quant: str) -> None:
    record = {"format": FORMATS[quant], "quant_type": quant, "blocksize": 64 if quant == "nf4" else GROUP,
              "dtype": str(dtype).removeprefix("torch."), "nested": nested, "layers": layers, "mask": mask.meta}
    (folder / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def quantize_folder(src: str | os.PathLike, mask: Mask, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    nested: bool = True, shard_bytes: int = SHARD_BYTES, quant: str = "nf4") -> dict[str, int]:
    """Write the quantized folder of checkpoint ``src`` around ``mask`` without loading the model.

    Each tensor is read (an mmap view), quantized or cast, and handed to a shard writer; at
    most one output shard and one tensor are in memory. Gives the same tensors as
    :func:`save_quantized` of :func:`load_quantized` (tested byte for byte).
    """
    from transformers import AutoConfig, AutoTokenizer

    src = Path(src)
    if mask.is_full:
        raise SparseZOError("full ZO trains every weight, so nothing can be quantized; use a sparse mask with --quant")
    shapes = tensor_shapes(src)
    empty = skeleton(src, dtype)  # meta device: names and shapes only, to check the mask against
    for wname, shape in mask.shapes.items():
        if wname not in shapes:
            raise SparseZOError(f"the mask names {wname}, which the checkpoint in {src} does not have; "
                                "it was made for another model")
        if tuple(shapes[wname][0]) != tuple(shape):
            raise SparseZOError(f"the mask expects {wname} of shape {tuple(shape)}, the checkpoint has {shapes[wname][0]}")
        _module_name(wname)
    layers: dict[str, dict] = {}
    sizes = {"quantized": 0, "dense": 0}
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        for key, t in tqdm(iter_tensors(src), total=len(shapes), desc="quantize", unit="tensor", leave=False):
            if key in mask.indices:
                mname = _module_name(key)
                layer = from_linear(quant, t, None, mask.indices[key], dtype, nested)
                for bname, b in layer.named_buffers():
                    writer.add(f"{mname}.{bname}", b)
                    sizes["quantized"] += b.numel() * b.element_size()
                layers[mname] = _layer_info(layer, f"{mname}.bias" in shapes)
            elif _known(empty, key, src):
                writer.add(key, t.to(dtype))
                sizes["dense"] += t.numel() * dtype.itemsize
            del t
        writer.close()
        config = AutoConfig.from_pretrained(src)
        config.dtype = dtype
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        _write_record(tmp, layers, dtype, nested and quant == "nf4", mask, quant)
    return dict(sizes, total=sizes["quantized"] + sizes["dense"])


@torch.no_grad()
def load_quantized_folder(folder: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_quantized`."""
    folder = Path(folder)
    for need in ("config.json", QUANT_FILE):
        if not (folder / need).is_file():
            raise SparseZOError(f"quantized model folder {folder} lacks {need}; re-create it with save_quantized")
    try:
        record = json.loads((folder / QUANT_FILE).read_text())
    except json.JSONDecodeError as e:
        raise SparseZOError(f"{folder / QUANT_FILE} is not valid JSON ({e}); re-create the folder") from e
    quant = record.get("quant_type", "nf4")
    if quant not in FORMATS or record.get("format") != FORMATS[quant] or (quant == "int4" and record.get("blocksize") != GROUP):
        raise SparseZOError(f"{folder / QUANT_FILE} has format {record.get('format')!r} ({quant}, block "
                            f"{record.get('blocksize')}), expected one of {sorted(FORMATS.values())} (int4 with groups of "
                            f"{GROUP}); re-create the folder with sparsezo quantize")
    dtype = getattr(torch, record["dtype"])
    model = skeleton(folder, dtype)
    for name, info in record["layers"].items():
        out_f, in_f = info["shape"]
        _swap(model, name, new_layer(quant, in_f, out_f, dtype, info["k"], info["bias"], record["nested"]))
    for key, t in iter_tensors(folder):
        mname, _, pname = key.rpartition(".")
        module = model.get_submodule(mname)
        if isinstance(module, QUANT_LAYERS) and pname != "bias":
            getattr(module, pname).copy_(t)
        else:
            _set_dense(model, key, t)
    model.sparsezo_quant = record
    return _finish(model, folder)


def quantized_mask(model: nn.Module) -> Mask | None:
    """The mask a quantized model was built with (its 4-bit layers' exact entries), or None."""
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
    if not layers:
        return None
    record = getattr(model, "sparsezo_quant", {})
    return Mask({n: m.idx.clone() for n, m in layers.items()},
                {n: (m.out_features, m.in_features) for n, m in layers.items()}, dict(record.get("mask", {})))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights held by the model (tied tensors once): 4-bit layers, dense tensors, total."""
    seen: set[int] = set()
    quant = dense = 0
    for m in model.modules():
        tensors = list(m._parameters.values()) + [b for n, b in m._buffers.items() if n not in m._non_persistent_buffers_set]
        for t in tensors:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if isinstance(m, QUANT_LAYERS):
                quant += t.numel() * t.element_size()
            else:
                dense += t.numel() * t.element_size()
    return {"quantized": quant, "dense": dense, "total": quant + dense}
