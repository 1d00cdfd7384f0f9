"""The run lock: one writer per run directory, readers refused while it writes.

``flock`` where the filesystem supports it (the kernel drops it however the holder exits), and an
exclusively created pid file where it does not (some network filesystems).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import SparseZOError, os_hint
from ..io import make_parents, remove_empty

log = logging.getLogger(__name__)


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
        self._made = make_parents(self.path)
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
        remove_empty(self._made)
        self._made = []

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()
