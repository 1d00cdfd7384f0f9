"""Counter-based perturbation noise: z for any step is regenerated from (run seed, step, query).

Nothing about z is ever stored. θ is split into fixed blocks of ``BLOCK`` entries and block b of
step t's query i is drawn from its own seed, so a z entry depends only on its position in θ,
never on how the work is chunked (callers stream full-ZO sets in larger chunks).

``rademacher`` uses an integer hash (splitmix64 finaliser) computed with int64 tensor ops, so
its values are the same on every device; ``gaussian`` uses torch's generator (CPU-seeded).
"""

from __future__ import annotations

import torch

BLOCK = 1 << 16
_MASK63 = (1 << 63) - 1
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15


def mix(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64), used to derive per-step seeds."""
    x = 0
    for v in values:
        x = (x + _GOLDEN + (v & ((1 << 64) - 1))) & ((1 << 64) - 1)
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
        x ^= x >> 31
    return x & _MASK63


def step_seed(run_seed: int, step: int, query: int = 0) -> int:
    """The seed of query ``query`` at step ``step``: any step can be regenerated on its own."""
    return mix(run_seed, step, query)


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _hash_bits(seed: int, start: int, n: int, device) -> torch.Tensor:
    x = torch.arange(start, start + n, dtype=torch.int64, device=device) + (mix(seed) - (1 << 62))
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def sample(seed: int, start: int, end: int, dist: str, device="cpu") -> torch.Tensor:
    """z[start:end] (fp32) of the perturbation with ``seed``; blocks are generated independently."""
    out = torch.empty(end - start, dtype=torch.float32, device=device)
    pos = start
    while pos < end:
        b = pos // BLOCK
        b_end = min(end, (b + 1) * BLOCK)
        lo, hi = pos - b * BLOCK, b_end - b * BLOCK
        if dist == "rademacher":
            bits = _hash_bits(mix(seed, b), lo, hi - lo, device) & 1
            out[pos - start : b_end - start] = 1.0 - 2.0 * bits.to(torch.float32)
        elif dist == "gaussian":
            # always a whole block: torch.randn(n)[:m] differs from torch.randn(m) for the same seed
            g = torch.Generator(device="cpu").manual_seed(mix(seed, b))
            z = torch.randn(BLOCK, generator=g, dtype=torch.float32)[lo:hi]
            out[pos - start : b_end - start] = z.to(device)
        else:
            raise ValueError(f"unknown perturbation distribution {dist!r}")
        pos = b_end
    return out
