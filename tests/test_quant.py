"""4-bit NF4 base with exact 16-bit trainable entries."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from helpers import save_tiny_model, sentences, tiny_model, tiny_tokenizer  # noqa: E402
from sparsezo.errors import SparseZOError  # noqa: E402
from sparsezo.masks import compute_mask  # noqa: E402
from sparsezo.quant import NF4Linear  # noqa: E402
from sparsezo.quant.convert import (load_quantized, load_quantized_folder, quantize_model,  # noqa: E402
                                    save_quantized, weight_bytes)
from sparsezo.quant.nf4 import bnb_functional  # noqa: E402
from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine, step_seed  # noqa: E402

DT = torch.bfloat16


def _reference_weight(weight, idx):
    """Independent reference: bitsandbytes' own round trip, then the exact entries written back."""
    bnbf = bnb_functional()
    codes, qs = bnbf.quantize_4bit(weight.to(DT), blocksize=64, quant_type="nf4", compress_statistics=True)
    w = bnbf.dequantize_4bit(codes, qs)
    w.view(-1)[idx] = weight.to(DT).reshape(-1)[idx]
    return w


def test_layer_output_equals_linear_with_dequantized_weight_and_exact_entries():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    idx = torch.randperm(weight.numel())[:30].sort().values
    layer = NF4Linear.from_linear(weight, bias, idx, DT)
    x = torch.randn(5, 64, dtype=DT)
    w_ref = _reference_weight(weight, idx)
    assert torch.equal(layer(x), F.linear(x, w_ref, bias.to(DT)))
    assert torch.equal(layer.dequantized().reshape(-1)[idx], weight.to(DT).reshape(-1)[idx])
    err = (layer.dequantized().float() - weight).abs().mean() / weight.abs().mean()
    assert 0.01 < err < 0.15  # it is really 4-bit, and a sane 4-bit


def test_perturbing_trainable_values_changes_output_only_through_masked_entries():
    model = tiny_model(dtype=DT)
    mask = compute_mask(model, "random", 0.05, seed=1)
    quantize_model(model, mask)
    params = TrainableParams(model, mask)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.in_features, dtype=DT)
    w0, y0 = layer.dequantized().clone(), layer(x)
    engine = ZOEngine(params, ZOConfig(eps=1e-2), 1)
    engine._perturb(step_seed(0, 0), 1e-2)
    w1 = layer.dequantized()
    changed = (w1 != w0).reshape(-1).nonzero().squeeze(1)
    assert changed.numel() > 0 and set(changed.tolist()) <= set(layer.idx.tolist())
    assert torch.equal(layer(x), F.linear(x, w1))
    assert not torch.equal(layer(x), y0)
    params.restore()
    assert torch.equal(layer(x), y0)


def test_streaming_load_and_saved_folder_match_in_place_quantization(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    ref = tiny_model(dtype=DT)
    mask = compute_mask(ref, "magnitude-small", 0.02)
    quantize_model(ref, mask)
    streamed = load_quantized(folder, mask, DT)
    ids = torch.arange(12)[None]
    assert torch.equal(streamed(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # still tied
    save_quantized(streamed, tiny_tokenizer(), tmp_path / "q", mask)
    again = load_quantized_folder(tmp_path / "q")
    assert torch.equal(again(input_ids=ids).logits, ref(input_ids=ids).logits)
    TrainableParams(again, mask)  # the mask still fits the reloaded model (names, shapes, fingerprint)


def test_weight_bytes_match_the_expected_count():
    model = tiny_model(dtype=DT)
    dense_before = weight_bytes(model)["total"]
    mask = compute_mask(model, "random", 0.05, seed=0)
    quantize_model(model, mask)
    n_q = mask.num_eligible
    blocks = sum(-(-(s[0] * s[1] // 64) // 256) for s in mask.shapes.values())
    per_layer_const = (16 + 256 + 1) * 4  # NF4 code table, 8-bit absmax code, offset
    heads = sum(min(64, s[0] * s[1]) for s in mask.shapes.values()) * 2
    expected_q = n_q // 2 + n_q // 64 + blocks * 4 + len(mask.shapes) * per_layer_const \
        + mask.num_trainable * (8 + 2) + heads
    wb = weight_bytes(model)
    assert wb["quantized"] == expected_q
    assert wb["dense"] == dense_before - n_q * 2  # everything else stays bf16
    assert wb["total"] < dense_before


def test_nf4_fine_tune_lowers_the_loss():
    from sparsezo.eval.scoring import batch_loss, encode, make_batch
    from sparsezo.tasks import Example
    from sparsezo.training.config import TrainConfig
    from sparsezo.training.loop import fine_tune

    model, tok = tiny_model(dtype=DT), tiny_tokenizer()
    mask = compute_mask(model, "magnitude-large", 0.2)
    quantize_model(model, mask)
    ex = lambda n, s: [Example(f"{t} It was", [" terrible", " great"], y) for y, t in sentences(n, s)]  # noqa: E731
    train_batch = make_batch(encode(tok, ex(128, 1)), tok.pad_token_id)
    before = batch_loss(model, train_batch)
    params = TrainableParams(model, mask)
    cfg = TrainConfig(steps=100, eval_every=100, keep_best=False, zo=ZOConfig(lr=0.1, eps=1e-2))
    fine_tune(model, tok, params, ex(128, 1), ex(16, 2), cfg, progress=False)
    # 0.005: over seeds 0-3 noise v1 lowered it by 0.015-0.036, v2 by 0.007-0.029 (seed 0: 0.007); the loss
    # starts at chance (0.693) and is deterministic given the seed, so any drop this size is learning
    assert batch_loss(model, train_batch) < before - 0.005


def test_bad_shapes_and_incomplete_folders_fail_clearly(tmp_path):
    from sparsezo.testing import tiny_llama

    odd = tiny_llama(hidden=24, vocab_size=40)  # k_proj is 12 x 24 = 288 entries: not whole 64-blocks
    mask = compute_mask(odd, "random", 0.1)
    with pytest.raises(SparseZOError, match="multiple of the NF4 block size"):
        quantize_model(odd, mask)
    model = tiny_model(dtype=DT)
    mask = compute_mask(model, "random", 0.05)
    quantize_model(model, mask)
    save_quantized(model, tiny_tokenizer(), tmp_path / "q", mask)
    (tmp_path / "q" / "model.safetensors").unlink()
    with pytest.raises(SparseZOError, match=r"no \*\.safetensors weights in .*q; sparsezo loads safetensors"):
        load_quantized_folder(tmp_path / "q")
    with pytest.raises(SparseZOError, match="nothing can be quantized"):
        quantize_model(tiny_model(), compute_mask(tiny_model(), "full"))
    other = compute_mask(tiny_model(dtype=DT), "random", 0.05, seed=9)
    with pytest.raises(SparseZOError, match="another set of entries"):
        TrainableParams(model, other)


def test_cli_quantized_train_eval_and_saved_base(tmp_path, capsys):
    import json

    from helpers import write_sst2
    from safetensors import safe_open
    from sparsezo.cli import main

    model_dir, data = save_tiny_model(tmp_path / "m"), write_sst2(tmp_path / "d")
    mask = tmp_path / "mask.safetensors"
    common = ["--model", str(model_dir), "--data-dir", str(data), "--num-test", "24"]
    assert main(["mask", "compute", "--model", str(model_dir), "--mask", "magnitude-large", "--density", "0.05",
                 "--out", str(mask)]) == 0
    capsys.readouterr()
    train = ["train", *common, "--mask", str(mask), "--steps", "6", "--eval-every", "3", "--num-train", "32",
             "--num-dev", "8", "--lr", "0.05", "--keep-last", "--json"]
    assert main([*train, "--quant", "nf4", "--out", str(tmp_path / "run_q")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["eval", *common, "--quant", "nf4", "--delta", str(tmp_path / "run_q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == trained["test_accuracy"]

    assert main([*train, "--out", str(tmp_path / "run_dense")]) == 0  # same delta format without --quant
    capsys.readouterr()
    keys = []
    for run in ("run_q", "run_dense"):
        with safe_open(str(tmp_path / run / "delta.safetensors"), "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1]

    q = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--mask", str(mask), "--out", str(q), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized"] > 0 and (q / "sparsezo_quant.json").is_file()
    assert main(["eval", *common, "--model", str(q), "--delta", str(tmp_path / "run_q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == trained["test_accuracy"]
    assert main(["train", *common, "--model", str(q), "--steps", "2", "--eval-every", "1", "--num-train", "16",
                 "--num-dev", "8", "--out", str(tmp_path / "run_from_q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_trainable"] == info["num_trainable"]
