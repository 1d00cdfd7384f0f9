"""The run lock: one writer, readers refused while it writes, and the pid-file fallback without flock."""

from __future__ import annotations

import errno
import fcntl
import json
import socket
import subprocess
import sys

import pytest

from sparsezo.errors import SparseZOError
from sparsezo.training.lock import RunLock


def test_readers_pass_without_a_writer_and_after_it_releases(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunLock(run).check_readable("replay")  # no lock file at all
    writer = RunLock(run).acquire()
    with pytest.raises(SparseZOError, match=r"is being written by pid \d+ on .*cannot replay it"):
        RunLock(run).check_readable("replay")
    writer.release()
    RunLock(run).check_readable("replay")
    assert list(tmp_path.iterdir()) == [run]  # readers leave no lock file behind


def test_a_stale_lock_file_does_not_block_readers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    lock.path.write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "since": "then"}))
    lock.check_readable("export")  # its writer died: the kernel released the flock


def test_a_writer_in_another_process_blocks_readers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from sparsezo.training.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(SparseZOError, match=f"pid {proc.pid}"):
            RunLock(run).check_readable("merge")
        assert not RunLock(run).try_acquire()
    finally:
        proc.kill()
        proc.wait()
    RunLock(run).check_readable("merge")  # the kernel dropped the dead writer's lock


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (some network filesystems)."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_a_pid_file_locks_writers_and_readers(tmp_path, no_flock):
    run = tmp_path / "run"
    run.mkdir()
    first = RunLock(run)
    assert first.try_acquire()
    assert json.loads(first.path.read_text())["pid"] > 0
    assert not RunLock(run).try_acquire()
    with pytest.raises(SparseZOError, match="is being written by"):
        RunLock(run).check_readable("info")
    first.release()
    assert not first.path.exists()
    RunLock(run).check_readable("info")
    second = RunLock(run)
    assert second.try_acquire()
    second.release()


def test_without_flock_a_dead_writers_pid_file_is_taken_over(tmp_path, no_flock):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = RunLock(run)
    lock.path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    lock.check_readable("replay")
    assert lock.try_acquire()
    lock.release()
    remote = RunLock(run)
    remote.path.write_text(json.dumps({"pid": 1, "host": "another-host", "since": "then"}))
    assert not remote.try_acquire()  # a remote holder cannot be checked from here: trusted
