"""int4 frozen base (PyTorch's int4 kernels) with exact trainable entries applied as a sparse correction."""

import pytest
import torch
import torch.nn.functional as F

from helpers import WORDS, tiny_tokenizer
from sparsezo.masks import compute_mask
from sparsezo.testing import tiny_llama
from sparsezo.quant import Int4Linear
from sparsezo.quant.convert import (load_quantized, load_quantized_folder, quantize_folder, quantize_model,
                                    quantized_mask, save_quantized)
from sparsezo.quant import int4
from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine, step_seed

DT = torch.bfloat16


@pytest.fixture
def eager(monkeypatch):
    """Eager kernels only (compiling costs seconds per shape), and the 4-bit matmul + correction
    path for tiny layers too (up to KERNEL_MAX_ROWS rows; more rows take the dequantized path)."""
    monkeypatch.setattr(int4, "_compiled", lambda *key: None)
    monkeypatch.setattr(int4, "_compiled_dequant", lambda *key: None)
    monkeypatch.setattr(int4, "KERNEL_MIN_WEIGHTS", 0)


def _model(dtype=DT):
    return tiny_llama(vocab_size=len(WORDS), hidden=64, layers=2, dtype=dtype)  # int4 needs in % 64, out % 32


def _layer(dtype, k=40, out=96, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g) * 0.05
    idx = torch.randperm(weight.numel(), generator=g)[:k].sort().values
    return weight, idx, Int4Linear.from_linear(weight, torch.randn(out, generator=g), idx, dtype)


def test_codes_pack_and_unpack_losslessly_and_dequantize_is_a_sane_4bit_weight():
    q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    assert torch.equal(int4.unpack(int4.pack(q)), q)
    weight, idx, layer = _layer(torch.float32)
    w = layer.dequantized()
    assert torch.equal(w.reshape(-1)[idx], weight.reshape(-1)[idx])  # the exact entries
    err = (w - weight).abs().mean() / weight.abs().mean()
    assert 0.02 < err < 0.15
    const = Int4Linear.from_linear(torch.full((32, 64), 0.3), None, None, torch.float32)
    assert torch.allclose(const.dequantized(), torch.full((32, 64), 0.3))  # a constant group is exact


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_layer_output_equals_linear_with_dequantized_weight_plus_exact_entries(eager, dtype):
    _, _, layer = _layer(dtype)
    for m in (1, 3, 37, int4.KERNEL_MAX_ROWS + 1):  # correction (CSR), and the dequantized path
        x = torch.randn(m, 128, dtype=dtype)
        ref = F.linear(x.float(), layer.dequantized().float(), layer.bias.float())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(layer(x).float(), ref, atol=tol, rtol=tol)
    x = torch.randn(2, 5, 128, dtype=dtype)
    assert layer(x).shape == (2, 5, 96)


def test_sparse_correction_is_the_change_of_the_exact_entries_only(eager):
    _, idx, layer = _layer(torch.float32)
    x = torch.randn(7, 128)
    w0, y0 = layer.dequantized(), layer(x)
    layer.values.add_(torch.linspace(-0.3, 0.3, idx.numel()))
    w1, y1 = layer.dequantized(), layer(x)
    assert set((w1 != w0).reshape(-1).nonzero().squeeze(1).tolist()) == set(idx.tolist())
    assert torch.allclose(y1 - y0, F.linear(x, w1 - w0), atol=1e-5)


def test_sparse_add_handles_a_layer_without_entries_and_per_half_deltas():
    y, x = torch.zeros(4, 32), torch.randn(4, 64)
    int4.sparse_add_(y, x, int4.sparse_layout(torch.empty(0, dtype=torch.int64), 64, 32), torch.empty(2, 0))
    assert not y.any()
    idx = torch.tensor([3, 64 + 5, 31 * 64 + 63])
    int4.sparse_add_(y, x, int4.sparse_layout(idx, 64, 32), torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]))
    want = torch.zeros(4, 32)
    for h, d in ((slice(0, 2), (1.0, 2.0, 3.0)), (slice(2, 4), (-1.0, 0.0, 0.5))):
        want[h, 0], want[h, 1], want[h, 31] = d[0] * x[h, 3], d[1] * x[h, 5], d[2] * x[h, 63]
    assert torch.allclose(y, want, atol=1e-6)


@pytest.mark.parametrize("k", [40, 1500])  # ≤ in + out: gather + index_add_; above: the CSR product
def test_sparse_add_equals_the_dense_product_on_both_paths(k):
    g = torch.Generator().manual_seed(k)
    idx = torch.randperm(32 * 64, generator=g)[:k].sort().values
    delta = torch.randn(2, k, generator=g)
    x, y = torch.randn(6, 64, generator=g), torch.randn(6, 32, generator=g)
    want = y.clone()
    for h, rows in enumerate((slice(0, 3), slice(3, 6))):
        dense = torch.zeros(32 * 64).index_copy_(0, idx, delta[h]).reshape(32, 64)
        want[rows] += x[rows] @ dense.T
    int4.sparse_add_(y, x, int4.sparse_layout(idx, 64, 32), delta)
    assert torch.allclose(y, want, atol=1e-5)


def test_compiled_amx_matmul_matches_the_eager_kernel():
    weight, idx, layer = _layer(DT, out=128, inp=64, seed=3)
    key = (128, 64, int4.GROUP)
    x = torch.randn(19, 64, dtype=DT)
    y = layer.base_mm(x)
    if int4._COMPILED.get(key) is None:
        pytest.skip("the compiled AMX int4 matmul is unavailable on this machine (no AMX or no C++ compiler)")
    ref = int4._reference(x, layer.qweight, layer.scales_zeros, int4.GROUP)
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert torch.equal(layer.base_mm(x), y)  # deterministic
    one = layer.base_mm(x[:1])  # one row is padded (dynamo would specialise size 1 to another kernel)
    assert torch.allclose(one.float(), ref[:1], atol=2e-2 * ref.abs().max().item())


def test_int4_folders_stream_save_and_merge_like_in_place_quantization(eager, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsezo.export.hf import save_merged

    src = tmp_path / "m"
    _model(torch.float32).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    ref = _model()
    mask = compute_mask(ref, "random", 0.02, seed=1)
    quantize_model(ref, mask, quant="int4")
    ids = torch.arange(1, 13)[None]
    want = ref(input_ids=ids).logits
    streamed = load_quantized(src, mask, DT, quant="int4")
    assert torch.equal(streamed(input_ids=ids).logits, want)
    save_quantized(streamed, tiny_tokenizer(), tmp_path / "q", mask)
    quantize_folder(src, mask, tmp_path / "qf", DT, quant="int4")
    for folder in ("q", "qf"):
        again = load_quantized_folder(tmp_path / folder)
        assert again.sparsezo_quant["quant_type"] == "int4"
        assert torch.equal(again(input_ids=ids).logits, want)
        assert quantized_mask(again).digest() == mask.digest()
    params = TrainableParams(again, mask)  # ZO writes the layers' exact values
    params.theta.add_(0.05)
    params.restore()
    tuned = again(input_ids=ids).logits
    save_merged(again, tiny_tokenizer(), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=DT)
    layer = again.model.layers[1].mlp.down_proj
    assert torch.equal(merged.model.layers[1].mlp.down_proj.weight, layer.dequantized())  # weights: exact
    assert torch.allclose(merged(input_ids=ids).logits.float(), tuned.float(), atol=0.05)  # logits: other kernel


def test_int4_zo_step_moves_only_the_exact_values(eager):
    model = _model()
    mask = compute_mask(model, "random", 0.02, seed=2)
    quantize_model(model, mask, quant="int4")
    layer = model.model.layers[0].mlp.up_proj
    codes, values = layer.qweight.clone(), layer.values.clone()
    params = TrainableParams(model, mask)
    ZOEngine(params, ZOConfig(eps=1e-2), 1)._perturb(step_seed(0, 0), 1e-2)
    assert torch.equal(layer.qweight, codes)
    assert not torch.equal(layer.values, values)
    params.restore()
    assert torch.equal(layer.values, values)


def test_shapes_int4_cannot_hold_fail_clearly():
    from sparsezo.errors import SparseZOError

    odd = tiny_llama(hidden=32, vocab_size=40)  # in = 32 is not a whole group of 64
    with pytest.raises(SparseZOError, match="does not fit int4 groups of 64"):
        quantize_model(odd, compute_mask(odd, "random", 0.1), quant="int4")
