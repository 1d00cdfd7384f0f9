"""Fisher scores over a 4-bit base: the gradient w.r.t. each 4-bit layer's dequantized weight."""

import copy

import pytest
import torch
from torch import nn

from helpers import WORDS, sentences, tiny_tokenizer
from sparsezo.masks import compute_mask, sensitivity_scores
from sparsezo.masks.quantized import QuantWeight, eligible_tensors
from sparsezo.model.params import eligible_parameters
from sparsezo.testing import tiny_llama
from sparsezo.quant import QUANT_LAYERS
from sparsezo.quant.convert import quantize_model

TEXTS = [" ".join(s for _, s in sentences(400, 5))]
OPTS = dict(calib_tokens=256, seq_len=32, micro_batch=2)


def tiny_model(seed: int):
    """Hidden size 64: every linear fits int4's groups of 64 inputs and NF4's blocks."""
    return tiny_llama(seed=seed, vocab_size=len(WORDS), hidden=64, layers=2)


def _bases(quant: str):
    """(4-bit model, a dense model whose linear weights are exactly the 4-bit layers' dequantized ones)."""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    q = quantize_model(tiny_model(3), quant=quant)
    dense = tiny_model(3)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QUANT_LAYERS):
                dense.get_submodule(name).weight.copy_(m.dequantized())
    return q, dense


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_fisher_over_a_4bit_base_equals_the_dense_fisher_of_its_dequantized_weights(quant):
    q, dense = _bases(quant)
    names = list(eligible_parameters(dense))
    params = eligible_tensors(q)
    assert list(params) == names and all(isinstance(p, QuantWeight) for p in params.values())
    got = sensitivity_scores(q, tiny_tokenizer(), TEXTS, **OPTS)
    ref = sensitivity_scores(dense, tiny_tokenizer(), TEXTS, **OPTS)
    assert list(got) == names
    for n in names:
        assert got[n].shape == ref[n].shape
        assert ref[n].abs().sum() > 0
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-10 * ref[n].abs().max().item())


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_a_mask_computed_over_a_4bit_base_is_usable_as_usual(quant):
    q, dense = _bases(quant)
    mask = compute_mask(q, "sensitive", 0.02, tokenizer=tiny_tokenizer(), texts=TEXTS, **OPTS)
    ref = compute_mask(dense, "sensitive", 0.02, tokenizer=tiny_tokenizer(), texts=TEXTS, **OPTS)
    assert mask.shapes == ref.shapes
    overlap = sum(len(set(mask.indices[n].tolist()) & set(ref.indices[n].tolist())) for n in ref.indices)
    assert overlap >= 0.95 * ref.num_trainable  # the same scores up to float rounding order
    mask.check_model(tiny_model(3))  # the names and shapes of the dense model: quantize with it, train as usual
    assert not any(isinstance(m, nn.Linear) and m.weight.requires_grad for m in q.modules())
    assert all(type(m).forward is m.forward.__func__ for m in q.modules() if isinstance(m, QUANT_LAYERS))


def test_rules_that_read_weight_values_are_refused_over_a_4bit_base():
    from sparsezo.errors import SparseZOError

    q = quantize_model(copy.deepcopy(tiny_model(3)), quant="int4")
    with pytest.raises(SparseZOError, match="4-bit base"):
        compute_mask(q, "magnitude-small", 0.02)


def test_cli_mask_compute_over_a_4bit_base_gives_a_mask_for_the_dense_model(tmp_path, capsys):
    """`mask compute --quant nf4`: the Fisher of a plain 4-bit base; its mask loads against the dense model
    and overlaps the dense-Fisher mask (4-bit rounding moves the scores, not the picture)."""
    pytest.importorskip("bitsandbytes", reason="NF4 needs bitsandbytes")
    from helpers import save_tiny_model
    from sparsezo import Mask, load_model
    from sparsezo.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the film number {i} was good and fun" for i in range(200)))
    common = ["mask", "compute", "--model", str(model_dir), "--dtype", "float32", "--mask", "sensitive",
              "--density", "0.05", "--calib", str(calib), "--calib-tokens", "256", "--calib-seq-len", "64"]
    assert main([*common, "--out", str(tmp_path / "dense.safetensors")]) == 0
    assert main([*common, "--quant", "nf4", "--out", str(tmp_path / "nf4.safetensors")]) == 0
    dense, nf4 = Mask.load(tmp_path / "dense.safetensors"), Mask.load(tmp_path / "nf4.safetensors")
    nf4.check_model(load_model(model_dir, "float32")[0])
    assert nf4.num_trainable == dense.num_trainable
    both = sum(len(set(dense.indices[n].tolist()) & set(nf4.indices[n].tolist())) for n in dense.indices)
    assert 0.3 < both / (2 * dense.num_trainable - both) < 1.0
    assert main([*common, "--quant", "nf4", "--mask", str(tmp_path / "dense.safetensors"),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "scores a rule over a 4-bit base" in capsys.readouterr().err


def test_cli_mask_compute_over_a_quantized_folder_scores_its_4bit_layers(tmp_path, capsys):
    """`mask compute --model QFOLDER` (a `sparsezo quantize` folder): the rule is scored over the folder's
    4-bit layers, as the API does on the loaded folder, and is not the mask the folder was built with."""
    pytest.importorskip("bitsandbytes", reason="NF4 needs bitsandbytes")
    from helpers import save_tiny_model
    from sparsezo import Mask, load_model
    from sparsezo.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the film number {i} was good and fun" for i in range(200)))
    assert main(["mask", "compute", "--model", str(model_dir), "--mask", "random", "--density", "0.05",
                 "--out", str(tmp_path / "random.safetensors")]) == 0
    assert main(["quantize", "--quant", "nf4", "--model", str(model_dir), "--dtype", "float32",
                 "--mask", str(tmp_path / "random.safetensors"), "--out", str(tmp_path / "q")]) == 0
    opts = ["--mask", "sensitive", "--density", "0.05", "--calib", str(calib), "--calib-tokens", "256",
            "--calib-seq-len", "64"]
    assert main(["mask", "compute", "--model", str(tmp_path / "q"), *opts, "--json",
                 "--out", str(tmp_path / "s.safetensors")]) == 0
    assert '"quantized_base": true' in capsys.readouterr().out
    got = Mask.load(tmp_path / "s.safetensors")
    model, tok = load_model(tmp_path / "q")
    ref = compute_mask(model, "sensitive", 0.05, tokenizer=tok, texts=[calib.read_text()], calib_tokens=256,
                       seq_len=64)
    built = Mask.load(tmp_path / "random.safetensors")
    assert got.rule == "sensitive" and set(got.indices) == set(ref.indices)
    assert all(torch.equal(got.indices[n], ref.indices[n]) for n in ref.indices)
    assert any(not torch.equal(got.indices[n], built.indices[n]) for n in built.indices if n in got.indices)


@pytest.mark.parametrize("mask_given", [False, True])
def test_a_plain_4bit_base_loads_on_the_host_and_each_layer_is_quantized_onto_the_device(tmp_path, monkeypatch,
                                                                                        mask_given):
    """`mask compute --quant` on a GPU: a 7B base's bf16 linears (13.5 GB) must never sit on the GPU together.
    Without a GPU here, the device is recorded by spies: where the model loads, where each 4-bit layer is built,
    where the whole goes last. A given mask streams its own way (load_model quantizes while reading)."""
    from sparsezo.masks import Mask
    from sparsezo.model import load as L
    from sparsezo.quant import Int4Linear

    folder = tmp_path / "m"
    tiny_model(3).save_pretrained(folder)  # hidden 64: int4's groups fit
    tiny_tokenizer().save_pretrained(folder)
    seen = {"load": [], "quantize": [], "to": []}
    real_load, real_quantize, real_to = L.load_model, L.quantize_model, nn.Module.to

    def load_model(path, dtype, device, **kw):
        seen["load"].append(device)
        return real_load(path, dtype, "cpu", **kw)

    def quantize_model(model, mask, quant, device=None):
        seen["quantize"].append(device)
        return real_quantize(model, mask, quant=quant, device="cpu")

    def to(self, *args, **kw):
        if args and args[0] == "cuda:3":
            seen["to"].append(type(self).__name__)
            return self
        return real_to(self, *args, **kw)

    monkeypatch.setattr(L, "load_model", load_model)
    monkeypatch.setattr(L, "quantize_model", quantize_model)
    monkeypatch.setattr(nn.Module, "to", to)
    mask = None
    if mask_given:
        mask = compute_mask(L.load_model(folder, "float32", "cpu")[0], "random", 0.05, seed=0)
        seen["load"].clear()
    model, _, got = L.build_model(folder, "float32", "cuda:3", quant="int4", mask=mask)
    assert seen["load"] == ["cuda:3" if mask_given else "cpu"]  # a given mask: streamed, 4-bit as it is read
    assert seen["quantize"] == ([] if mask_given else ["cuda:3"])  # layer by layer onto the device
    assert seen["to"] == [type(model).__name__]  # then the model (embeddings, norms) goes there whole
    assert all(type(model.get_submodule(n.rsplit(".", 1)[0])) is Int4Linear
               for n in eligible_parameters(tiny_model(0)))
    assert isinstance(got, Mask) if mask_given else got is None
