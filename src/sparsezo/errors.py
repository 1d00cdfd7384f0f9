"""One exception type for every user-facing failure, and how environment failures are worded.

The CLI turns a :class:`SparseZOError` into a single ``sparsezo: error: ...`` line and exit
code 2, so every message must say what went wrong, where, and how to fix it. Failures of the
machine rather than of sparsezo (a full disk, a read-only folder, a missing permission) arrive
as :class:`OSError`; :func:`from_os_error` words them the same way, so the user reads the
path and the fix instead of a traceback.
"""

from __future__ import annotations

import errno
import re

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another --out",
    errno.EROFS: "the filesystem is read-only: choose another --out",
    errno.EACCES: "permission denied: check the folder's permissions or choose another path",
    errno.EPERM: "operation not permitted: check the folder's permissions or choose another path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "an I/O error occurred: check the disk",
}


class SparseZOError(Exception):
    """Bad input or an unusable file: shown to the user as one line, exit code 2."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind like KeyboardInterrupt (a run keeps its checkpoints).

    A BaseException, so ``except Exception`` clean-up code never swallows it.
    """

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum, self.name = signum, name


def os_hint(code: int | None, flag: str = "--out") -> str:
    """How to fix an OS-level failure with error number ``code`` (``flag``: the option that named the path)."""
    return _HINTS.get(code or -1, "check the path, its permissions and the free disk space").replace("--out", flag)


def from_os_error(e: OSError, doing: str = "cannot access", flag: str = "--out") -> SparseZOError:
    """``e`` as one line: what failed, on which path, and the fix."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or "a file"
    reason = e.strerror or str(e) or type(e).__name__
    return SparseZOError(f"{doing} {where} ({reason}); {os_hint(e.errno, flag)}")


def os_errno_in(message: str) -> int | None:
    """The error number a library quoted in its message ("... (os error 28)"), e.g. safetensors' Rust I/O errors."""
    m = re.search(r"os error (\d+)", message)
    return int(m.group(1)) if m else None
