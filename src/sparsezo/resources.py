"""Memory: what a process really uses, what the machine has left, and early "too small" errors.

Peak RSS (``ru_maxrss``) counts the pages of mmap'ed safetensors shards, which a small machine
simply evicts and re-reads; what must fit is the *anonymous* memory (heap, tensors a program
created). So reports carry both: ``peak_anon_bytes`` (sampled from ``/proc/self/status``
RssAnon by a background thread, since Linux keeps no peak of it) and ``peak_rss_bytes``.
``peak_memory_bytes`` is the figure to compare with a device: CUDA ``max_memory_allocated``
on a GPU, peak anonymous memory on CPU. The available memory is the tighter of the machine's
``MemAvailable`` and the process's cgroup limit minus the group's anonymous use, which is how
a container or ``memlimit`` run is bounded.
"""

from __future__ import annotations

import re
import resource
import sys
import threading
from pathlib import Path

import torch

from .errors import SparseZOError


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def anon_bytes() -> int | None:
    """Current anonymous resident memory of this process (Linux), or None where unknown."""
    kib = _status_kib("RssAnon")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size, file-backed pages included (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


class _AnonSampler:
    """Tracks this process's peak anonymous memory every ``interval`` seconds (a daemon thread)."""

    def __init__(self, interval: float = 0.02):
        self.peak = anon_bytes() or 0
        self.interval = interval
        self._stop = threading.Event()
        if anon_bytes() is not None:
            threading.Thread(target=self._run, name="sparsezo-anon-sampler", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        now = anon_bytes() or 0
        self.peak = max(self.peak, now)
        return self.peak


_sampler: _AnonSampler | None = None


def start_memory_tracking() -> None:
    """Start sampling peak anonymous memory (idempotent; the CLI calls it at start-up)."""
    global _sampler
    if _sampler is None:
        _sampler = _AnonSampler()


def peak_anon_bytes() -> int | None:
    """Peak anonymous memory since :func:`start_memory_tracking` (or the current value), or None."""
    if _sampler is None:
        return anon_bytes()
    return _sampler.sample()


def peak_memory_bytes(device: str | torch.device = "cpu") -> int:
    """The peak that must fit the device: CUDA max allocated, else peak anonymous memory (RSS if unknown)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    anon = peak_anon_bytes()
    return peak_rss_bytes() if anon is None else anon


def memory_report(device: str | torch.device = "cpu") -> dict[str, int | str]:
    """Every memory figure a command reports, with which one ``peak_memory_bytes`` is."""
    cuda = torch.device(device).type == "cuda"
    # on CUDA both peaks: the device's (peak_memory_bytes) and the host's (peak_anon/rss_bytes)
    out: dict[str, int | str] = {"peak_memory_bytes": peak_memory_bytes(device),
                                 "peak_memory_kind": "cuda_max_allocated" if cuda else "anon",
                                 "peak_memory_device": str(torch.device(device)),
                                 "peak_rss_bytes": peak_rss_bytes()}
    anon = peak_anon_bytes()
    if anon is not None:
        out["peak_anon_bytes"] = anon
    elif not cuda:
        out["peak_memory_kind"] = "rss"
    return out


# ----------------------------------------------------------------------------- what is left
def _cgroup_dirs() -> list[Path]:
    """This process's memory cgroup directories (v2 unified and/or v1 memory controller)."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
                if (root / "cgroup.controllers").exists():
                    out.append(root / path.lstrip("/"))
                    break
        elif "memory" in controllers.split(","):
            out.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/"))
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (l.split() for l in path.read_text().splitlines() if len(l.split()) == 2)}
    except (OSError, ValueError):
        return {}


def available_memory_bytes(device: str | torch.device | None = None) -> int | None:
    """Memory this process may still use on ``device`` (default: the host), or None when unknown.

    CUDA: the device's free memory plus what torch's caching allocator holds but has not handed
    out (reserved − allocated), since that is reusable by this process; a plan for a CUDA model
    must read this, not the host's RAM (a 24 GB card would be OOM-killed instead of run in passes).
    Host: min(MemAvailable, for each enclosing cgroup with a limit: limit − the group's anonymous
    use). Page cache is not subtracted: the kernel reclaims it under a limit.
    """
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    avail = []
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if m:
            avail.append(int(m.group(1)) * 1024)
    except OSError:
        pass
    for d in _cgroup_dirs():
        if (d / "memory.max").exists():  # v2
            limit, anon = _read_int(d / "memory.max"), _stat(d / "memory.stat").get("anon")
        else:  # v1
            limit, anon = _read_int(d / "memory.limit_in_bytes"), _stat(d / "memory.stat").get("total_rss")
        if limit is not None and limit < 2**60 and anon is not None:
            avail.append(max(0, limit - anon))
    return min(avail) if avail else None


def parse_bytes(text: str, what: str = "--max-memory") -> int:
    """``4.5G``, ``512M``, ``1e9`` → bytes (powers of 1024 for K/M/G/T)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.I)
    if not m:
        raise SparseZOError(f"{what} {text!r} is not a size; write e.g. 4.5G or 512M")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(need: int, what: str, how: str, available: int | None = None) -> None:
    """Fail before loading anything when ``need`` bytes cannot fit what is left.

    ``how``: the option(s) that lower the need, named in the error.
    """
    available = available_memory_bytes() if available is None else available
    if available is not None and need > available:
        raise SparseZOError(f"{what} needs about {gib(need)} of memory, but only {gib(available)} is available; {how}")
