"""Reading and writing Hugging Face-style sharded safetensors one tensor at a time.

A 7B checkpoint (13.5 GB in bf16) does not fit a small machine, so ``quantize`` and ``merge``
never hold a model: they read a tensor (an mmap view of its shard), transform it, and hand it
to a :class:`ShardWriter`, which writes it to disk at once. The layout is the one
``transformers`` reads: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` when there is more than one shard.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SparseZOError

SHARD_BYTES = 1 << 30
INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors weight files of a model folder (the index's, when there is one)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SparseZOError(f"{index} is not a valid safetensors index ({e}); re-create the model folder") from e
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SparseZOError(f"{index} names {missing[:2]}, missing from {folder}; the checkpoint is incomplete")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SparseZOError(f"no *.safetensors weights in {folder}; sparsezo loads safetensors checkpoints only")
    return files


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of a folder, file by file; tensors are mmap views (no copy)."""
    for f in checkpoint_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)
        except SparseZOError:
            raise
        except Exception as e:  # safetensors raises several types for truncated / garbage files
            raise SparseZOError(f"{f} is not a readable safetensors file ({e}); re-create or re-download it") from e


def tensor_shapes(folder: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, dtype) of every weight, from the headers only (nothing is read)."""
    out = {}
    for f in checkpoint_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    out[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:
            raise SparseZOError(f"{f} is not a readable safetensors file ({e}); re-create or re-download it") from e
    return out


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes``, each tensor as it arrives.

    Why not ``safetensors.torch.save_file`` per shard: it needs the shard's tensors all in memory
    at once (up to ``max_bytes`` of anonymous memory when they are freshly made, e.g. dequantized
    weights). Here each tensor's bytes go straight to a data file, and the shard is finished by
    writing the safetensors header (8-byte length, JSON, 8-byte aligned) in front of that data —
    the documented format, read back by ``safe_open`` in the tests. Memory: one tensor.
    """

    def __init__(self, folder: str | Path, max_bytes: int = SHARD_BYTES):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        self._header: dict[str, dict] = {}
        self._data = None
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise SparseZOError(f"cannot write {name}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        if self._header and self._offset + nbytes > self.max_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.files):05d}.data", "wb")
        if nbytes:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total += nbytes

    def _finish_shard(self) -> None:
        data_path = self.folder / f".shard-{len(self.files):05d}.data"
        if self._data is None:
            self._data = open(data_path, "wb")
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path = self.folder / f".shard-{len(self.files):05d}.safetensors"
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        data_path.unlink()
        self.files.append((path, list(self._header)))
        self._header, self._data, self._offset = {}, None, 0

    def close(self) -> int:
        """Finish the last shard, give the shards their final names (and the index); total bytes."""
        if self._header or not self.files:
            self._finish_shard()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return self.total
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({k: final for k in names})
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                     "weight_map": weight_map}, indent=2) + "\n")
        return self.total
