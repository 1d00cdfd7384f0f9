"""4-bit frozen base: quantize the eligible linears of a model around a mask, save and load it.

Three ways to get a quantized model, all giving the same layers:
- :func:`quantize_model`: in place, layer by layer, on a loaded model (when the mask was just
  computed on the full-precision weights);
- :func:`load_quantized`: streaming from a Hugging Face safetensors folder, one tensor at a time,
  so the full-precision model never exists whole in memory (peak ≈ quantized model + one tensor);
- :func:`load_quantized_folder`: a folder written by :func:`save_quantized` (no re-quantization).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import SparseZOError
from ..io import atomic_dir
from ..masks import Mask
from .nf4 import NF4Linear

QUANT_FILE = "sparsezo_quant.json"
FORMAT = "sparsezo.nf4/1"
QUANT_TYPES = ("nf4",)


def _module_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise SparseZOError(f"--quant applies to linear weights; the mask names {weight_name}, which is not one")
    return weight_name[: -len(".weight")]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, mask: Mask | None = None, nested: bool = True) -> nn.Module:
    """Replace every linear the mask covers by an :class:`NF4Linear` keeping the masked entries exact.

    Without a mask, every eligible linear is quantized with no exact entries (a plain 4-bit base).
    """
    if mask is None:
        from ..models import eligible_parameters

        params = eligible_parameters(model)
        mask = Mask({n: torch.empty(0, dtype=torch.int64) for n in params}, {n: tuple(p.shape) for n, p in params.items()},
                    {"rule": "none", "density": 0.0})
    if mask.is_full:
        raise SparseZOError("full ZO trains every weight, so nothing can be quantized; use a sparse mask with --quant")
    for wname, idx in mask.indices.items():
        lin = model.get_submodule(_module_name(wname))
        if not isinstance(lin, nn.Linear):
            raise SparseZOError(f"{wname} belongs to a {type(lin).__name__}, not a Linear layer; it cannot be quantized")
        _swap(model, _module_name(wname), NF4Linear.from_linear(lin.weight, lin.bias, idx, lin.weight.dtype, nested))
    model.sparsezo_quant = {"mask": mask.meta}
    return model


def _shells(model: nn.Module, mask: Mask, dtype: torch.dtype, nested: bool, has_bias: set[str]) -> dict[str, NF4Linear]:
    shells = {}
    for wname, idx in mask.indices.items():
        if idx is None:
            raise SparseZOError("full ZO trains every weight, so nothing can be quantized; use a sparse mask with --quant")
        mname = _module_name(wname)
        out_f, in_f = mask.shapes[wname]
        shells[wname] = NF4Linear(in_f, out_f, dtype, idx.numel(), nested, f"{mname}.bias" in has_bias)
        shells[wname].idx.copy_(idx)
        _swap(model, mname, shells[wname])
    return shells


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model's modules with parameters on the meta device (buffers real), no weights loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _finish(model: nn.Module, folder: Path) -> nn.Module:
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise SparseZOError(f"the checkpoint in {folder} lacks {missing[:3]} ({len(missing)} tensors); it is incomplete")
    model.eval().requires_grad_(False)
    model.name_or_path = str(folder)
    return model


def _checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SparseZOError(f"no *.safetensors weights in {folder}; --quant loads safetensors checkpoints only")
    return files


def _set_dense(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mname, _, pname = key.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(value, requires_grad=False)
    elif pname in module._buffers:
        module._buffers[pname] = value
    else:
        raise SparseZOError(f"checkpoint tensor {key} matches no parameter of the model; is it the right folder?")


@torch.no_grad()
def load_quantized(folder: str | os.PathLike, mask: Mask, dtype: torch.dtype = torch.bfloat16,
                   nested: bool = True) -> nn.Module:
    """Load an HF safetensors checkpoint, quantizing the mask's linears while streaming.

    Each tensor is read, cast or quantized, and dropped before the next one is read.
    """
    folder = Path(folder)
    files = _checkpoint_files(folder)
    keys = {k for f in files for k in safe_open(str(f), framework="pt").keys()}
    model = _skeleton(folder, dtype)
    shells = _shells(model, mask, dtype, nested, keys)
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if key in shells:
                    shells[key].quantize_(t, None)
                elif key.endswith(".bias") and f"{key[:-5]}.weight" in shells:
                    shells[f"{key[:-5]}.weight"].bias.data.copy_(t.to(dtype))
                else:
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
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    record = {"format": FORMAT, "quant_type": "nf4", "blocksize": 64,
              "dtype": str(next(iter(layers.values())).dtype).removeprefix("torch."),
              "nested": next(iter(layers.values())).nested,
              "layers": {n: {"shape": [m.out_features, m.in_features], "k": m.idx.numel(), "bias": m.bias is not None}
                         for n, m in layers.items()},
              "mask": mask.meta}
    with atomic_dir(folder) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / QUANT_FILE).is_file()


@torch.no_grad()
def load_quantized_folder(folder: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_quantized`."""
    folder = Path(folder)
    for need in ("config.json", QUANT_FILE, "model.safetensors"):
        if not (folder / need).is_file():
            raise SparseZOError(f"quantized model folder {folder} lacks {need}; re-create it with save_quantized")
    try:
        record = json.loads((folder / QUANT_FILE).read_text())
    except json.JSONDecodeError as e:
        raise SparseZOError(f"{folder / QUANT_FILE} is not valid JSON ({e}); re-create the folder") from e
    if record.get("format") != FORMAT:
        raise SparseZOError(f"{folder / QUANT_FILE} has format {record.get('format')!r}, expected {FORMAT!r}")
    dtype = getattr(torch, record["dtype"])
    model = _skeleton(folder, dtype)
    for name, info in record["layers"].items():
        out_f, in_f = info["shape"]
        _swap(model, name, NF4Linear(in_f, out_f, dtype, info["k"], record["nested"], info["bias"]))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
        for key in st.keys():
            t = st.get_tensor(key)
            mname, _, pname = key.rpartition(".")
            module = model.get_submodule(mname)
            if isinstance(module, NF4Linear) and pname != "bias":
                getattr(module, pname).copy_(t)
            else:
                _set_dense(model, key, t)
    model.sparsezo_quant = record
    return _finish(model, folder)


def quantized_mask(model: nn.Module) -> Mask | None:
    """The mask a quantized model was built with (its 4-bit layers' exact entries), or None."""
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
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
            if isinstance(m, NF4Linear):
                quant += t.numel() * t.element_size()
            else:
                dense += t.numel() * t.element_size()
    return {"quantized": quant, "dense": dense, "total": quant + dense}


__all__ = ["NF4Linear", "QUANT_TYPES", "is_quantized_folder", "load_quantized", "load_quantized_folder",
           "quantize_model", "quantized_mask", "save_quantized", "weight_bytes"]
