"""Peak memory, for reports and benchmarks: CUDA max allocated, or the process's peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, peak resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
