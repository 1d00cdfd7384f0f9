"""export --format peft: a SHiRA adapter that the real peft package loads onto the plain base."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny_model

peft = pytest.importorskip("peft", minversion="0.17", reason="the [peft] extra (pip install 'sparsezo[peft]')")


OUTLIER = "model.layers.1.mlp.down_proj.weight"


def _delta(model, density=0.05, seed=3, include=None, outlier=False):
    """A global random mask (uneven entries per layer) with trained values θ + noise; ``outlier`` makes one
    layer far denser than the rest, as a global sensitive mask does (SmolLM2: 21,506 entries in one layer)."""
    from sparsezo.training.checkpoint import Delta
    from sparsezo.masks import compute_mask
    from sparsezo.zo import TrainableParams

    mask = compute_mask(model, "random", density, seed=seed, include=include)
    if outlier:
        mask.indices[OUTLIER] = torch.arange(0, model.get_parameter(OUTLIER).numel(), 2)
    params = TrainableParams(model, mask)
    g = torch.Generator().manual_seed(seed)
    trained = params.theta + 0.05 * torch.randn(params.theta.shape, generator=g)
    values = {n: trained[params.offsets[k]:params.offsets[k + 1]].clone() for k, n in enumerate(params.names)}
    params.restore()
    return Delta(mask, values, {})


@pytest.mark.parametrize("dtype,outlier", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_peft_loads_the_adapter_and_matches_the_merged_model(tmp_path, dtype, outlier):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparsezo.export.peft import export_peft
    from sparsezo.model.load import load_model
    from sparsezo.model.params import DTYPES

    folder = save_tiny_model(tmp_path / "base")
    model, _ = load_model(folder, dtype)
    delta = _delta(model, outlier=outlier)
    counts = {n: int(i.numel()) for n, i in delta.mask.indices.items()}
    assert len(set(counts.values())) > 3  # uneven per layer, as a global top-k mask is
    info = export_peft(model, delta, tmp_path / "adapter", base_name=str(folder))
    assert info["trained_entries"] == delta.mask.num_trainable
    assert info["layers"] > 0 and info["inexact_entries"] == 0  # SHiRA layers, and each value adds back exactly
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    delta.apply(model)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        got, want = adapted(input_ids=ids).logits, model(input_ids=ids).logits
        merged = adapted.merge_and_unload()
        for name, idx in delta.mask.indices.items():  # every trained entry exactly, in the run's dtype
            assert torch.equal(merged.get_parameter(name).view(-1)[idx], model.get_parameter(name).view(-1)[idx])
    assert (got - want).abs().max() <= (1e-5 if dtype == "float32" else 0.0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["base_model_name_or_path"] == str(folder)
    if outlier:  # stored whole rather than padding every other layer to its rank
        assert OUTLIER.removesuffix(".weight") in config["modules_to_save"]


def test_cli_export_peft_and_what_shira_cannot_carry(tmp_path, capsys):
    from sparsezo.cli import main
    from sparsezo.model.load import load_model

    folder = save_tiny_model(tmp_path / "base")
    model, _ = load_model(folder, "float32")
    delta = _delta(model)
    delta.meta.update(model=str(folder), dtype="float32")
    delta.save(tmp_path / "delta.safetensors")
    assert main(["export", "--format", "peft", "--delta", str(tmp_path / "delta.safetensors"), "--out",
                 str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["peft_type"] == "SHIRA" and info["layers"] == len(delta.mask.indices)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    emb = _delta(model, include=r"embed_tokens")
    emb.meta.update(model=str(folder), dtype="float32")
    emb.save(tmp_path / "emb.safetensors")
    assert main(["export", "--format", "peft", "--delta", str(tmp_path / "emb.safetensors"), "--out",
                 str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err
    assert "not a linear layer's weight" in err and not (tmp_path / "emb").exists()


def test_rank_plan_stores_an_outlier_whole_instead_of_padding_every_layer():
    from sparsezo.export.peft import plan_rank

    dims = {f"l{k}": (576, 1536) for k in range(30)}
    counts = {f"l{k}": 500 for k in range(29)} | {"l29": 21506}  # needs r = 1 vs r = 11
    assert plan_rank(counts, dims, 2) == (1, {"l29"})
    assert plan_rank(counts, dims, None) == (11, set())  # a 4-bit base: no dense weight to store
    assert plan_rank({"a": 10, "b": 2500}, {"a": (576, 1536), "b": (576, 1536)}, 2) == (2, set())


def test_padding_positions_are_free_and_deterministic():
    from sparsezo.export.peft import _padding

    idx = torch.tensor([0, 1, 2, 5, 9])
    pad = _padding(idx, 20, 9)
    assert pad.tolist() == [3, 4, 6, 7] and not set(pad.tolist()) & set(idx.tolist())


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_a_delta_trained_over_a_4bit_base_exports_for_every_4bit_type(tmp_path, quant):
    """The adapter on the full-precision base equals sparsezo's merge (base + delta), whatever 4-bit layer
    the run trained over: a 4-bit layer keeps its trained entries' base values exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparsezo import export_peft
    from sparsezo import load_model
    from sparsezo.quant import QUANT_LAYERS
    from sparsezo.quant.convert import load_quantized

    if quant == "nf4":
        pytest.importorskip("bitsandbytes", reason="NF4 needs bitsandbytes")
    folder = save_tiny_model(tmp_path / "base")
    dense, _ = load_model(folder, "float32")
    delta = _delta(dense, include=r"down_proj")  # 64 inputs: a whole int4 group
    four_bit = load_quantized(folder, delta.mask, torch.float32, quant=quant)
    assert any(isinstance(m, QUANT_LAYERS) for m in four_bit.modules())
    info = export_peft(four_bit, delta, tmp_path / "adapter", base_name=str(folder))
    assert info["trained_entries"] == delta.mask.num_trainable and info["inexact_entries"] == 0
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                        tmp_path / "adapter").eval()
    delta.apply(dense)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() <= 1e-5
