"""--dtype auto: bfloat16 only where it is native (CUDA, AVX512-BF16/AMX CPUs), float32 elsewhere."""

import pytest
import torch

from sparsezo.dtypes import cpu_flags, default_dtype, fast_bf16_cpu, resolve_dtype

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_are_read_from_the_cpuinfo_flags_line():
    assert cpu_flags(AVX2_ONLY) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_flags("no flags here") == set()


@pytest.mark.parametrize("info, want", [(AVX2_ONLY, "float32"), (SAPPHIRE_RAPIDS, "bfloat16"),
                                        ("flags : avx512f avx512bw", "float32")])  # AVX512 without BF16: emulated
def test_cpu_default_follows_native_bf16(info, want):
    flags = cpu_flags(info)
    assert fast_bf16_cpu(flags) == (want == "bfloat16")
    assert default_dtype("cpu", flags) == want


def test_explicit_dtypes_are_kept_and_auto_resolves():
    for name in ("bfloat16", "float16", "float32", None):
        assert resolve_dtype(name, "cpu") == name
    assert resolve_dtype("auto", "cpu") == default_dtype("cpu")
    assert resolve_dtype("auto", "cpu") in ("bfloat16", "float32")


def test_cuda_default_is_bf16_where_supported():
    want = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert default_dtype("cuda") == want
