"""Atomic file and directory writes, safetensors with JSON metadata, and the checks around them.

Every file sparsezo writes goes to a temporary sibling first and is renamed into place, so a
crash or a bad input never leaves a half-written mask, delta or run directory behind. The
temporary files get the permissions ``open()`` would give (the user's umask), not mkstemp's
0600, so a merged model folder can be shared like any other.

Also here: the writability/free-space check run before a model is loaded, the run-directory
lock, and the validators every reader applies to tensors and JSON from disk (files are user
input: a crafted or damaged file must be one error naming the file and field, never a crash
or a silently wrong result).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SparseZOError, os_errno_in, os_hint

META_KEY = "sparsezo"
log = logging.getLogger("sparsezo")


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
    made = _make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _remove_empty(made)
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
            _remove_empty(made)


def _make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; return those created, deepest first (to undo on failure)."""
    missing = []
    for p in [path.parent, *path.parent.parents]:
        if p.exists():
            break
        missing.append(p)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(missing)
        raise SparseZOError(f"cannot create the folder for {path} ({e.strerror}); {os_hint(e.errno)}") from e
    return missing


def _remove_empty(folders: list[Path]) -> None:
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
    made = _make_parents(path)
    try:
        tmp = temp_dir(path.parent, path.name)
    except OSError as e:
        _remove_empty(made)
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
            _remove_empty(made)


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


NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock unsupported by the filesystem


def _holder_record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()


class RunLock:
    """An exclusive lock on a run directory for as long as one process writes it.

    The lock is ``flock`` on ``PARENT/.NAME.lock`` (beside the run directory, which a fresh run
    creates only by renaming a finished temporary folder into place). The kernel drops it when
    the holder exits, however it exits, so a lock file left by a killed process is stale by
    construction and is simply taken over; it records the holder's pid and host for the message
    the next writer sees. The file is removed on release, and an acquirer re-checks that the
    file it locked is still the one at the path, so removal cannot let two writers in.
    Parent folders the lock had to create are removed again on release when still empty.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(os.path.realpath(run_dir))  # "runs/a/", "./runs/a", "." and symlinks lock alike
        self.path = self.run_dir.with_name(f".{self.run_dir.name}.lock")
        self.fd: int | None = None
        self._made: list[Path] = []

    def holder(self) -> str:
        """Who holds the lock, as recorded in the lock file ("pid N on HOST since ..."), or "another process"."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self, action: str = "write") -> "RunLock":
        if not self.try_acquire():
            raise SparseZOError(f"run directory {self.run_dir} is in use by {self.holder()} (lock "
                                f"{self.path}); cannot {action} it while that run is training: wait for it "
                                "to finish or stop it")
        return self

    def try_acquire(self) -> bool:
        """Take the lock, or return False when another process holds it (other failures raise)."""
        self._made = _make_parents(self.path)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                self._remove_made()
                raise SparseZOError(f"cannot lock run directory {self.run_dir}: cannot create {self.path} "
                                    f"({e.strerror}); {os_hint(e.errno)}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in NO_FLOCK:
                    return self._try_pid_lock()
                self._remove_made()
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise SparseZOError(f"cannot lock run directory {self.run_dir} ({e.strerror}); "
                                    "use a folder on a filesystem that supports file locks") from e
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: retry
        if os.fstat(fd).st_size > 0:  # left by a process that died holding it; the kernel has released it
            log.debug("taking over the stale lock of %s on %s", self.holder(), self.run_dir)
        os.ftruncate(fd, 0)
        os.write(fd, _holder_record())
        self.fd = fd
        return True

    def _try_pid_lock(self) -> bool:
        """The fallback where ``flock`` is unsupported (some network filesystems): an exclusively
        created lock file holding the writer's pid and host. A file whose holder is a dead pid on
        this host is stale and taken over; one from another host is trusted until removed by hand,
        because its pid cannot be checked from here."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if self._pid_holder_alive():
                    self._remove_made()
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale: its writer died without removing it
                continue
            except OSError as e:
                self._remove_made()
                raise SparseZOError(f"cannot lock run directory {self.run_dir}: cannot create {self.path} "
                                    f"({e.strerror}); {os_hint(e.errno)}") from e
            os.write(fd, _holder_record())
            self.fd = fd
            return True
        self._remove_made()
        return False

    def _pid_holder_alive(self) -> bool:
        """Whether the pid-file lock's holder may still run (unknown or remote holders count as alive)."""
        try:
            text = self.path.read_text()
            if not text:  # a flock-style lock file left empty: no pid-file holder wrote it
                return False
            info = json.loads(text)
            pid, host = int(info["pid"]), str(info["host"])
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError):
            return True
        if host != socket.gethostname():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def check_readable(self, action: str) -> None:
        """Refuse to read a run that a writer holds, with one line naming the holder.

        Readers (replay, eval --delta, merge, export, info) read several files of a run; a
        training process rewrites them at every checkpoint, so a read during training could mix
        two checkpoints. Why a check and not a held shared lock: a reader must also work on a
        read-only copy of a run, where it cannot create a lock file — and where no writer can
        start either. A writer that starts after this check fails its own lock only if it races
        the reader within the read itself; the files are replaced atomically, so such a reader
        sees either the old or the new file of each name, and checkpoints carry their own digests.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no writer: writers create the lock file before they touch the run
        except OSError:
            return  # unreadable lock file: cannot tell; the files' own checks still apply
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except OSError as e:
            held = e.errno in (errno.EAGAIN, errno.EACCES) or (e.errno in NO_FLOCK and self._pid_holder_alive())
        finally:
            os.close(fd)  # closing drops the shared lock
        if held:
            raise SparseZOError(f"run directory {self.run_dir} is being written by {self.holder()} (lock "
                                f"{self.path}); cannot {action} it until that run finishes or is stopped")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        _remove_empty(self._made)
        self._made = []

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()
