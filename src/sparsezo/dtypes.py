"""``--dtype auto``: the compute dtype that is fast where the run happens.

bfloat16 halves the weights' memory, but it is only fast where the hardware multiplies it
natively: CUDA GPUs, and CPUs with AVX512-BF16 or AMX. Elsewhere PyTorch emulates it, and a
bf16 matmul measured ~5x slower than fp32 on this project's 2-core AVX2 machine. So ``auto``
picks bfloat16 there and float32 otherwise. An explicit dtype is never changed: the numbers of a
run (the demo's included) depend on the dtype, and a given dtype gives the same ones as before.
"""

from __future__ import annotations

from pathlib import Path

import torch

AUTO = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of a native bf16 dot product


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS or Windows)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        try:
            cpuinfo = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def fast_bf16_cpu(flags: set[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so bf16 beats fp32."""
    return any(f in (cpu_flags() if flags is None else flags) for f in BF16_CPU_FLAGS)


def default_dtype(device: str | torch.device = "cpu", flags: set[str] | None = None) -> str:
    """bfloat16 on a CUDA device that supports it or on a CPU with native bf16, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and fast_bf16_cpu(flags) else "float32"


def resolve_dtype(name: str | None, device: str | torch.device = "cpu") -> str | None:
    """``auto`` → :func:`default_dtype` for ``device``; any other name (or None) as given."""
    return default_dtype(device) if name == AUTO else name
