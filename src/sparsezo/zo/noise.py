"""Counter-based perturbation noise: z for any step is regenerated from (run seed, step, query).

Nothing about z is ever stored: entry i of a perturbation depends only on (seed, i), never on
how the work is chunked (callers stream full-ZO sets in larger chunks).

Version 2 (the default, ``NOISE_VERSION``) is computed where θ lives, in integer tensor ops
whose results are exact, so z is the same bit for bit on every device (the CPU and CUDA share
no generator; a CPU-seeded one meant a host copy per 65,536 entries, the whole step overhead on
a GPU). A keyed 32-bit counter hash (two rounds of the lowbias32 mixer, in int64 ops masked to
32 bits, no multiplication that overflows) gives one word per word index w, the key mixing the
seed with w's region of 2**32 words:

* ``rademacher``: 32 entries a word, one bit each (entry i = bit i mod 32 of word i // 32);
* ``gaussian``: 2 entries a word, its low and high 16 bits indexing a 65,536-entry quantile
  table Φ⁻¹((k + ½)/65536), rescaled to unit variance. A value is a table lookup: no
  transcendental runs on the device (log/cos may differ in the last bit between devices), the
  mean is exactly 0 (the table is antisymmetric), the variance 1, the tails cut at ±4.3σ —
  SPSA needs zero mean and unit covariance, not exact normality.

Version 1 (trajectories written before; ``sample(..., version=1)``) is kept verbatim: a
splitmix64 hash per entry for ``rademacher`` and torch's CPU generator per 65,536-entry block
for ``gaussian``, whose values depend on the CPU generator and are copied to the device.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import sys

import torch

NOISE_VERSION = 2  # what new runs record (ZOConfig.noise); trajectories without it are version 1
NOISE_VERSIONS = (1, 2)
BLOCK = 1 << 16  # version 1's generator block
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


def _sample_v1(seed: int, start: int, end: int, dist: str, device) -> torch.Tensor:
    """Version 1 (verbatim): z[start:end] (fp32) of ``seed``; blocks are generated independently."""
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


# ---- version 2 ---------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_LOWBIAS = (0x7FEB352D, 0x846CA68B)  # lowbias32's multipliers (Wellons' hash prospector)
TABLE_BITS = 16
REGION_BITS = 32  # word indices per key: the hash input is a 32-bit counter
ENTRIES_PER_WORD = {"gaussian": 2, "rademacher": 32}
PIECE = {"cpu": 1 << 21, "cuda": 1 << 24}  # entries per piece: bounds temporaries (CPU: near cache size)
if sys.byteorder != "little":  # the word → entries split reads words as bytes/halves (every torch device is)
    raise ImportError("sparsezo's noise needs a little-endian machine")


def _signed32(v: int) -> int:
    """The int32 value whose bits are the 32-bit unsigned ``v``."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 words (in place). Multiplication wraps mod 2**32 on every torch device
    (two's complement), so the bits are those of the unsigned hash; >> is arithmetic, hence the masks."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(_signed32(_LOWBIAS[0]))
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(_signed32(_LOWBIAS[1]))
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


def hash_words(seed: int, w0: int, n: int, device="cpu") -> torch.Tensor:
    """The 32-bit words (int32 bits) of word indices [w0, w0 + n) for ``seed``; the range must lie in one region.

    Word w: k = mix(seed, w >> 32); h = lowbias32(lowbias32((w + k_lo) mod 2**32) ^ k_hi).
    """
    region = w0 >> REGION_BITS
    if n <= 0 or (w0 + n - 1) >> REGION_BITS != region:
        raise ValueError("hash_words: the range must be non-empty and lie in one region")
    key = mix(seed, region)
    lo = (w0 & _M32) + (key & _M32)
    # counters mod 2**32 as int32 bit patterns: one int32 range where they do not wrap, else
    # converted exactly (in range) from int64
    first = _signed32(lo & _M32)
    if first + n <= 1 << 31:
        x = torch.arange(first, first + n, dtype=torch.int32, device=device)
    else:
        x = torch.arange(lo, lo + n, dtype=torch.int64, device=device)
        x = x.add_(1 << 31).bitwise_and_(_M32).sub_(1 << 31).to(torch.int32)
    x = _lowbias32(x).bitwise_xor_(_signed32((key >> 32) & _M32))
    return _lowbias32(x)


def hash_word_reference(seed: int, w: int) -> int:
    """:func:`hash_words` for one word in Python integers: the specification the tensor code is tested against."""
    key = mix(seed, w >> REGION_BITS)

    def lowbias(x: int) -> int:
        x ^= x >> 16
        x = (x * _LOWBIAS[0]) & _M32
        x ^= x >> 15
        x = (x * _LOWBIAS[1]) & _M32
        return x ^ (x >> 16)

    return lowbias(lowbias(((w & _M32) + (key & _M32)) & _M32) ^ ((key >> 32) & _M32))


def _build_table() -> torch.Tensor:
    """Φ⁻¹((k + ½)/65536), k < 65536, in float64 (Python's own inverse CDF), antisymmetric by
    construction, scaled to unit variance, rounded once to float32. Built on the CPU only."""
    n = 1 << TABLE_BITS
    half = [statistics.NormalDist().inv_cdf((k + 0.5) / n) for k in range(n // 2)]  # the negative half
    values = half + [-v for v in reversed(half)]
    scale = 1.0 / math.sqrt(math.fsum(v * v for v in values) / n)
    return torch.tensor([v * scale for v in values], dtype=torch.float64).to(torch.float32)


_TABLES: dict[str, torch.Tensor] = {}


def gaussian_table(device="cpu") -> torch.Tensor:
    """The 65,536 float32 Gaussian quantiles on ``device`` (built once on the CPU, then copied once per device)."""
    key = str(torch.device(device))
    if key not in _TABLES:
        cpu = _TABLES.get("cpu")
        if cpu is None:
            cpu = _TABLES["cpu"] = _build_table()
        _TABLES[key] = cpu.to(device)
    return _TABLES[key]


def table_digest() -> str:
    """sha256 of the Gaussian table's float32 bytes (pinned by the tests: z depends on every value)."""
    return hashlib.sha256(gaussian_table("cpu").numpy().tobytes()).hexdigest()


_BYTE_SIGNS: dict[str, torch.Tensor] = {}


def _byte_signs(device) -> torch.Tensor:
    """[256, 8] float32: row b holds 1 − 2·(bit j of b), j = 0..7 (exact values, the same on every device)."""
    key = str(torch.device(device))
    if key not in _BYTE_SIGNS:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _BYTE_SIGNS[key] = (1 - 2 * bits).to(torch.float32).to(device)
    return _BYTE_SIGNS[key]


def _entries(seed: int, w0: int, n: int, dist: str, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """All entries of words [w0, w0 + n) of one region, in order (fp32; into ``out`` when given); one
    gather from an exact table.

    gaussian: the word's 16-bit halves, low first (entries 2w, 2w + 1); rademacher: its bytes, low
    first, each giving 8 entries bit by bit (entry 32w + 8k + j = bit 8k + j).
    """
    h = hash_words(seed, w0, n, device)
    if dist == "gaussian":
        idx = h.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        return torch.index_select(gaussian_table(device), 0, idx, out=out)
    signs = _byte_signs(device)
    idx = h.view(torch.uint8).to(torch.int32)
    if out is None:
        return signs.index_select(0, idx).reshape(-1)
    return torch.index_select(signs, 0, idx, out=out.view(-1, 8)).reshape(-1)


def _sample_v2(seed: int, start: int, end: int, dist: str, device) -> torch.Tensor:
    per = ENTRIES_PER_WORD.get(dist)
    if per is None:
        raise ValueError(f"unknown perturbation distribution {dist!r}")
    device = torch.device(device)
    piece = PIECE.get(device.type, PIECE["cuda"]) // per
    out = torch.empty(end - start, dtype=torch.float32, device=device)
    w, w_end = start // per, -(-end // per)
    while w < w_end:
        n = min(w_end - w, piece, (((w >> REGION_BITS) + 1) << REGION_BITS) - w)
        lo, hi = max(start, w * per), min(end, (w + n) * per)
        if lo == w * per and hi == (w + n) * per:  # whole words: written in place, no copy
            _entries(seed, w, n, dist, device, out[lo - start : hi - start])
        else:
            out[lo - start : hi - start] = _entries(seed, w, n, dist, device)[lo - w * per : hi - w * per]
        w += n
    return out


def sample(seed: int, start: int, end: int, dist: str, device="cpu", version: int = NOISE_VERSION) -> torch.Tensor:
    """z[start:end] (fp32) of the perturbation with ``seed``, generated on ``device``.

    ``version`` 2 is exact and identical on every device; 1 is the legacy generator old
    trajectories were trained with.
    """
    if version == 1:
        return _sample_v1(seed, start, end, dist, device)
    if version == 2:
        return _sample_v2(seed, start, end, dist, device)
    raise ValueError(f"unknown noise version {version!r}; known: {NOISE_VERSIONS}")
