"""``sparsezo export --format peft``: a delta as a PEFT SHiRA adapter (``PeftModel.from_pretrained`` loads it).

People serve fine-tunes as PEFT adapters over a shared base. PEFT has two sparse formats; neither
has a per-layer size, which a global top-k mask needs (its layers hold very uneven numbers of
entries):

- **SHiRA** (``shira_indices`` [2, n] + ``shira_weight`` [n] per layer, PEFT ≥ 0.17) gives every
  layer n = r·(in + out) entries for one global r; the indices are stored, and the weights are
  *added* to the base weight in fp32.
- **Super-Tuning** (flat int32 indices + fp32 values) gives every layer n = int(numel·(1 − sparsity))
  for one global sparsity and adds the values *after casting them to the base dtype*.

Both carry an arbitrary index set exactly only when each layer is padded up to the common size
with zero-valued entries at untrained positions (adding 0 changes nothing). SHiRA's size grows
with in + out, so padding to the largest r wastes at most in + out − 1 entries per layer and
usually far less than padding every layer to the densest layer's fraction; and its fp32
addition reproduces the trained bf16 weight exactly (w + (bf16(θ) − w) is exact in fp32), where
Super-Tuning's cast of the difference to bf16 first can round. So sparsezo writes SHiRA.

What an adapter cannot carry: it adds to the base the user loads. The values are exact for the
base loaded in the run's dtype (the export's ``--dtype``); a fine-tune trained over a 4-bit base
gets its trained entries exactly, but the other weights are then the full-precision base's, not
the 4-bit ones it was trained against (use ``merge`` or GGUF export for what sparsezo computed).
Only linear-layer weights can be adapted (SHiRA wraps ``nn.Linear``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparseZOError

log = logging.getLogger(__name__)

PEFT_MIN = "0.17"  # first PEFT with SHiRA


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers by weight name: dense ``nn.Linear`` and every 4-bit layer type."""
    from .quant import QUANT_LAYERS

    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANT_LAYERS))}


def _base_values(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The base weight's entries at ``idx`` in the model's dtype: a 4-bit layer kept them exactly."""
    from .quant import QUANT_LAYERS

    if isinstance(module, QUANT_LAYERS):
        if not torch.equal(module.idx.cpu(), idx.cpu()):
            raise SparseZOError("PEFT export: the 4-bit base was quantized for another mask than the delta's; "
                                "export with the base the run trained on (its recorded --model)")
        return module.values.detach().cpu()
    return module.weight.detach().reshape(-1)[idx.to(module.weight.device)].cpu()


def _padding(idx: torch.Tensor, numel: int, n: int) -> torch.Tensor:
    """``n − len(idx)`` flat positions not in ``idx``: the first free ones (deterministic)."""
    extra = n - idx.numel()
    window = min(numel, n + idx.numel())  # at most len(idx) of these are taken, so ≥ extra are free
    taken = torch.zeros(window, dtype=torch.bool)
    taken[idx[idx < window]] = True
    return (~taken).nonzero().flatten()[:extra]


SHIRA_ENTRY_BYTES = 12  # two int32 coordinates + one fp32 value


def plan_rank(counts: dict[str, int], dims: dict[str, tuple[int, int]], dense_bytes: int | None) -> tuple[int, set[str]]:
    """The SHiRA rank r and the layers stored whole instead (PEFT's ``modules_to_save``) that make the
    adapter smallest.

    Every SHiRA layer holds r·(in + out) entries, so one dense outlier (a global mask put 21,506
    entries into one SmolLM2 layer, 11× the next) would pad all 205 others 11-fold. A layer whose
    trained count needs more than r is stored as its whole merged weight (``dense_bytes`` an entry,
    the base dtype) when that is smaller overall; ``dense_bytes=None`` forbids it (a 4-bit base has
    no full-precision weight to store).
    """
    need = {n: math.ceil(k / (o + i)) for n, k in counts.items() for o, i in [dims[n]]}
    best: tuple[int, int, set[str]] | None = None
    for r in sorted(set(need.values())):
        if dense_bytes is None and r < max(need.values()):
            continue
        dense = {n for n, q in need.items() if q > r or r * sum(dims[n]) > dims[n][0] * dims[n][1]}
        size = sum(SHIRA_ENTRY_BYTES * r * sum(dims[n]) for n in need if n not in dense)
        size += sum((dense_bytes or 0) * dims[n][0] * dims[n][1] for n in dense)
        if best is None or size < best[0]:
            best = (size, r, dense)
    return best[1], best[2]


@torch.no_grad()
def export_peft(model: nn.Module, delta, out: str | os.PathLike, base_name: str | None = None) -> dict[str, Any]:
    """Write ``delta`` as a SHiRA adapter folder ``out`` for the base ``model`` (atomically).

    Each SHiRA layer stores v = dtype(θ) − w at its trained entries, padded with zeros to the
    common r·(in + out) entries; the few layers too dense for the chosen r (see :func:`plan_rank`)
    are stored whole, merged, as ``modules_to_save``. Returns sizes, r and the padding share.
    """
    from safetensors.torch import save_file

    from .io import atomic_dir, write_json
    from .quant import QUANT_LAYERS

    delta.mask.check_model(model, "delta")
    linears = _linear_modules(model)
    names = [n for n, idx in delta.mask.indices.items() if idx is None or idx.numel()]
    not_linear = [n for n in names if n not in linears]
    if not_linear:
        raise SparseZOError(f"PEFT export: the delta trains {not_linear[0]}, which is not a linear layer's weight; "
                            "SHiRA adapts nn.Linear weights only: use sparsezo merge or --format gguf")
    if any(delta.mask.indices[n] is None for n in names):
        raise SparseZOError("PEFT export: the delta trains every entry of its tensors (--mask full); a sparse "
                            "adapter would be larger than the weights: use sparsezo merge or --format gguf")
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    dims = {n: tuple(delta.mask.shapes[n]) for n in names}  # (out, in)
    four_bit = any(isinstance(linears[n], QUANT_LAYERS) for n in names)
    r, dense = plan_rank({n: delta.mask.indices[n].numel() for n in names}, dims,
                         None if four_bit else dtype.itemsize)
    too_dense = [n for n in names if n not in dense and r * sum(dims[n]) > dims[n][0] * dims[n][1]]
    if too_dense:
        raise SparseZOError(f"PEFT export: the densest layer needs SHiRA rank {r}, more entries than "
                            f"{too_dense[0]} has; the mask is too dense for SHiRA: use sparsezo merge or --format gguf")
    tensors: dict[str, torch.Tensor] = {}
    stored = trained = inexact = 0
    for n in names:
        o, i = dims[n]
        idx = delta.mask.indices[n].to(torch.int64).cpu()
        target = delta.values[n].reshape(-1).cpu().to(dtype)  # what the merged model holds
        module = n[: -len(".weight")]
        trained += idx.numel()
        if n in dense:  # the whole merged weight (and bias): exact by construction
            w = linears[n].weight.detach().cpu().clone()
            w.view(-1)[idx] = target
            tensors[f"base_model.model.{n}"] = w
            if linears[n].bias is not None:
                tensors[f"base_model.model.{module}.bias"] = linears[n].bias.detach().cpu().clone()
            continue
        base = _base_values(linears[n], idx)
        v = target.float() - base.float()
        inexact += int((base.float() + v).to(dtype).ne(target).sum())
        pad = _padding(idx, o * i, r * (o + i))
        flat = torch.cat([idx, pad])
        order = flat.argsort()
        flat, v = flat[order], torch.cat([v, torch.zeros(pad.numel())])[order]
        tensors[f"base_model.model.{module}.shira_indices"] = torch.stack([flat // i, flat % i]).to(torch.int32)
        tensors[f"base_model.model.{module}.shira_weight"] = v.contiguous()
        stored += flat.numel()
    config = {
        "peft_type": "SHIRA", "r": r, "mask_type": "random", "random_seed": None, "fan_in_fan_out": False,
        "init_weights": True, "inference_mode": True, "task_type": None, "revision": None, "auto_mapping": None,
        "target_modules": sorted(n[: -len(".weight")] for n in names if n not in dense),
        "modules_to_save": sorted(n[: -len(".weight")] for n in dense) or None,
        "base_model_name_or_path": base_name, "peft_version": _peft_version(),
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "adapter_config.json", config)
    shira_trained = trained - sum(delta.mask.indices[n].numel() for n in dense)
    info = {"out": str(out), "format": "peft", "peft_type": "SHIRA", "r": r, "layers": len(names) - len(dense),
            "dense_layers": len(dense), "trained_entries": trained, "stored_entries": stored,
            "padding": round(1 - shira_trained / stored, 4) if stored else 0.0,
            "bytes": (Path(out) / "adapter_model.safetensors").stat().st_size, "dtype": str(dtype).removeprefix("torch."),
            "inexact_entries": inexact, "supertuning_entries": supertuning_entries(delta)}
    if inexact:
        log.warning("%d of %d trained entries do not round back exactly in %s (base + value); their difference is "
                    "one rounding step", inexact, trained, info["dtype"])
    if delta.meta.get("quant"):
        log.warning("the delta was trained over a 4-bit base: the adapter sets its %d trained entries exactly, but "
                    "the base PEFT loads is full precision, not the 4-bit weights the run trained against", trained)
    return info


def _peft_version() -> str:
    """The installed PEFT's version (recorded in the adapter as PEFT does), or the first that reads SHiRA."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return PEFT_MIN


def supertuning_entries(delta) -> int:
    """Entries a Super-Tuning adapter would need for ``delta``: one sparsity for all layers, so every layer
    is padded to the densest layer's fraction (the comparison the README quotes)."""
    sizes = {n: math.prod(delta.mask.shapes[n]) for n, idx in delta.mask.indices.items() if idx is not None and idx.numel()}
    top = max(delta.mask.indices[n].numel() / size for n, size in sizes.items())
    return sum(max(int(size * top), delta.mask.indices[n].numel()) for n, size in sizes.items())


def describe(info: dict[str, Any]) -> str:
    """One line for the CLI."""
    return (f"SHiRA adapter r={info['r']} over {info['layers']} layers (+ {info['dense_layers']} stored whole): "
            f"{info['trained_entries']} trained entries, {info['stored_entries']} SHiRA entries ({info['padding']:.1%} "
            f"zero padding), {info['bytes']} bytes -> {info['out']}")

