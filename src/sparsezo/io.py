"""Atomic file and directory writes, safetensors with JSON metadata, and the checks around them.

Every file sparsezo writes goes to a temporary sibling first and is renamed into place, so a
crash or a bad input never leaves a half-written mask, delta or run directory behind. The
temporary files get the permissions ``open()`` would give (the user's umask), not mkstemp's
0600, so a merged model folder can be shared like any other.

Also here: the writability/free-space check run before a model is loaded, and the validators every reader applies to tensors and JSON from disk (files are user
input: a crafted or damaged file must be one error naming the file and field, never a crash
or a silently wrong result).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SparseZOError, os_errno_in, os_hint

META_KEY = "sparsezo"


def umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _as_if_opened(path: Path, is_dir: bool) -> None:
    """Give a mkstemp/mkdtemp path (0600/0700) the mode ``open()``/``mkdir()`` would have created it with."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def _tree_as_if_opened(root: Path) -> None:
    """Every folder and file under ``root`` with the umask's permissions (execute bits of files kept).

    Writers called inside an atomic directory (safetensors' save_file, which HF ``save_pretrained``
    uses) create 0600 files whatever the umask; a model folder must be readable like any other.
    """
    mask = umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            f = Path(dirpath) / name
            if f.is_file() and not f.is_symlink():
                os.chmod(f, (0o666 | (f.stat().st_mode & 0o111)) & ~mask)


def temp_dir(parent: Path, name: str) -> Path:
    """A new hidden temporary folder ``parent/.name.XXXX.tmp`` with the umask's permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    _as_if_opened(tmp, is_dir=True)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    On failure the temporary file and any parent folders made for it are removed again.
    """
    path = Path(path)
    made = make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        remove_empty(made)
        raise SparseZOError(f"cannot create {path} ({e.strerror}); {os_hint(e.errno)}") from e
    os.close(fd)
    tmp_path = Path(tmp)
    ok = False
    try:
        yield tmp_path
        _as_if_opened(tmp_path, is_dir=False)  # after the writer: some (safetensors) re-create the file
        os.replace(tmp_path, path)
        ok = True
    finally:
        tmp_path.unlink(missing_ok=True)
        if not ok:
            remove_empty(made)


def make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; return those created, deepest first (to undo on failure)."""
    missing = []
    for p in [path.parent, *path.parent.parents]:
        if p.exists():
            break
        missing.append(p)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(missing)
        raise SparseZOError(f"cannot create the folder for {path} ({e.strerror}); {os_hint(e.errno)}") from e
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, those still empty (a failed write leaves nothing)."""
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` on success and vanishes on failure.

    Without ``overwrite``, a ``path`` that appeared meanwhile (another process) is never replaced.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SparseZOError(f"output directory {path} already exists; choose another --out or remove it")
    made = make_parents(path)
    try:
        tmp = temp_dir(path.parent, path.name)
    except OSError as e:
        remove_empty(made)
        raise SparseZOError(f"cannot create {path} ({e.strerror}); {os_hint(e.errno)}") from e
    ok = False
    try:
        yield tmp
        _tree_as_if_opened(tmp)
        if path.exists() and not overwrite:
            raise SparseZOError(f"output directory {path} was created by another process meanwhile; "
                                "nothing was written, choose another --out")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            remove_empty(made)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically: readers see the old file or the whole new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save tensors with ``meta`` stored as one JSON string in the safetensors header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        except Exception as e:  # safetensors reports I/O failures as SafetensorError("... (os error N)")
            code = os_errno_in(str(e))
            if code is None:
                raise
            raise SparseZOError(f"cannot write {path} ({os.strerror(code)}); {os_hint(code)}") from e


def load_tensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; ``what`` names the file kind in errors."""
    path = Path(path)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise SparseZOError(f"{what} file {path} {state}; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header[META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise SparseZOError(f"{what} file {path} has no sparsezo metadata ({e}); it was not written by sparsezo") from e
    except Exception as e:  # safetensors raises several types for truncated / garbage files
        raise SparseZOError(f"{what} file {path} is not a readable safetensors file ({e}); re-create it") from e
    if not isinstance(meta, dict):
        raise SparseZOError(f"{what} file {path}: the sparsezo metadata is a JSON {type(meta).__name__}, "
                            "not an object; the file is corrupt, re-create it")
    return tensors, meta


def read_json(path: str | os.PathLike, what: str, kind: type = dict) -> Any:
    """A JSON file that must hold a ``kind`` (an object by default); errors name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SparseZOError(f"{what} {path} does not exist; check the path") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparseZOError(f"{what} {path} is not valid JSON ({e}); restore it or re-create the run") from e
    if not isinstance(obj, kind):
        raise SparseZOError(f"{what} {path} holds a JSON {type(obj).__name__}, expected a {kind.__name__}; "
                            "restore it or re-create the run")
    return obj


def json_field(obj: dict, key: str, kinds: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """``obj[key]`` checked to be of ``kinds`` (bool is never taken for a number); errors name ``where``."""
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise SparseZOError(f"{where} lacks the field {key!r}; the file is corrupt, re-create it")
    v = obj[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise SparseZOError(f"{where}: field {key!r} is {v!r:.60}, expected {names}; the file is corrupt, re-create it")
    return v


def check_indices(idx: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """A stored flat-index tensor as int64, after checking it is integer, 1-D, strictly increasing and in [0, size).

    Float indices would be truncated and duplicates would train one weight twice, so neither is
    converted silently.
    """
    if idx.dtype not in (torch.int32, torch.int64):
        raise SparseZOError(f"{where}: indices are {str(idx.dtype).removeprefix('torch.')}, expected int32 or int64; "
                            "the file is corrupt, re-create it")
    if idx.dim() != 1:
        raise SparseZOError(f"{where}: indices have shape {list(idx.shape)}, expected one flat list; re-create the file")
    idx = idx.to(torch.int64)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            raise SparseZOError(f"{where}: index {lo if lo < 0 else hi} is outside the tensor's {size} entries; "
                                "the file does not belong to this model or is corrupt, re-create it")
        step = idx[1:] - idx[:-1]
        if (step == 0).any():
            raise SparseZOError(f"{where}: index {int(idx[1:][step == 0][0])} appears twice; re-create the file")
        if (step < 0).any():
            raise SparseZOError(f"{where}: indices are not sorted; re-create the file")
    return idx


def check_values(t: torch.Tensor, where: str, dtypes: tuple[torch.dtype, ...], numel: int | None = None,
                 shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A stored float tensor after checking dtype, shape or length, and that every entry is finite."""
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise SparseZOError(f"{where}: dtype {str(t.dtype).removeprefix('torch.')}, expected {names}; re-create the file")
    if shape is not None and tuple(t.shape) != shape:
        raise SparseZOError(f"{where}: shape {list(t.shape)}, expected {list(shape)}; the file is corrupt, re-create it")
    if numel is not None and (t.dim() != 1 or t.numel() != numel):
        raise SparseZOError(f"{where}: shape {list(t.shape)}, expected {numel} values in one flat list; "
                            "the file is corrupt, re-create it")
    bad = ~torch.isfinite(t)
    if bad.any():
        raise SparseZOError(f"{where}: {int(bad.sum())} of {t.numel()} values are NaN or infinite; the run that wrote "
                            "it diverged or the file is corrupt (retrain with a lower --lr)")
    return t


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, need_bytes: int = 0, what: str = "--out") -> None:
    """Fail now, not after a model has loaded, when ``path`` cannot be created or the disk lacks room.

    Creates and removes one probe file in the nearest existing ancestor folder: permission bits
    alone do not tell (root ignores them, a read-only mount does not show in them).
    """
    path = Path(path)
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise SparseZOError(f"{what} {path}: {base} is a file, not a folder; choose another path")
    try:
        limit = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    new = [p for p in [path, *path.parents] if not p.exists()]  # the names this write will create
    long = [p.name for p in new if len(p.name) + 24 > limit]  # + room for the temporary names' affixes
    if long:
        raise SparseZOError(f"{what} {path}: the name {long[0][:40]!r}... is longer than this filesystem allows "
                            f"({limit} bytes, less room for temporary names); choose a shorter path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparsezo-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SparseZOError(f"{what} {path} cannot be created in {base} ({e.strerror}); {os_hint(e.errno)}") from e
    free = shutil.disk_usage(base).free
    if need_bytes and free < need_bytes:
        raise SparseZOError(f"{what} {path}: {base} has {free / 2**20:.2f} MiB free, the run needs about "
                            f"{need_bytes / 2**20:.2f} MiB; free some space or choose another --out")
