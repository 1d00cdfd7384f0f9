"""--type q4_0+q8_0: a 4-bit GGUF whose tensors holding most trained entries are stored at 8 bits."""

from __future__ import annotations

import json

import pytest
import torch

from gguf_helpers import bpe_model, bpe_tokenizer
from sparsezo.export.gguf_plan import KEEP_SHARE, MIXED, keep_tensors, storage_plan

PROMPT = " the movie was good and the plot is fun"


@pytest.mark.parametrize("trained,share,kept", [
    # densest first (trained entries per weight), until the share is held
    ({"a": 10, "b": 40, "c": 50}, 0.4, ["b"]),  # b: 40/100 = 0.4 > c: 50/400 > a: 10/100
    ({"a": 10, "b": 40, "c": 50}, 0.5, ["b", "c"]),
    ({"a": 10, "b": 40, "c": 50}, 0.9, ["b", "c"]),
    ({"a": 10, "b": 40, "c": 50}, 1.0, ["b", "c", "a"]),
    ({"a": 0, "b": 0, "c": 5}, 0.9, ["c"]),  # untrained tensors are never kept
    ({"a": 20, "b": 20}, 0.5, ["a"]),  # equal density: model order
    ({}, 0.9, []),
])
def test_keep_tensors_takes_the_densest_until_the_share_is_held(trained, share, kept):
    shapes = {"a": (10, 10), "b": (10, 10), "c": (20, 20), "norm": (10,)}
    assert keep_tensors(shapes, trained, share) == kept


def test_storage_plan_keeps_the_output_layer_at_8_bits_tied_or_not():
    shapes = {"token_embd.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64),
              "blk.0.attn_norm.weight": (32,)}
    tied = storage_plan(shapes, {"blk.0.ffn_up.weight": 9, "blk.0.ffn_down.weight": 1}, "q4_0+q8_0")
    assert tied == {"token_embd.weight": "Q8_0", "blk.0.ffn_up.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_0"}
    untied = storage_plan({**shapes, "output.weight": (64, 32)}, {}, "q4_0+q8_0")
    assert untied["output.weight"] == "Q8_0" and untied["token_embd.weight"] == "Q4_0"
    assert untied["blk.0.ffn_up.weight"] == untied["blk.0.ffn_down.weight"] == "Q4_0"


def _concentrated_delta(model):
    """A delta whose trained entries sit mostly in two tensors (as a sensitive mask's do), each moved by less
    than a 4-bit step and more than an 8-bit one."""
    from sparsezo.masks import Mask
    from sparsezo.training.checkpoint import Delta

    names = [n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    heavy = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"}
    g = torch.Generator().manual_seed(0)
    indices, values = {}, {}
    for name in names:
        p = model.get_parameter(name).detach().reshape(-1)
        idx = torch.randperm(p.numel(), generator=g)[: 256 if name in heavy else 4].sort().values
        step = torch.where(torch.rand(idx.numel(), generator=g) < 0.5, -1.0, 1.0) * 0.002
        indices[name], values[name] = idx, p[idx] + step
    mask = Mask(indices, {n: tuple(model.get_parameter(n).shape) for n in names}, {"rule": "test"})
    return Delta(mask, values, {}), heavy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The same tiny fine-tune written as q4_0, q8_0 and each mixed type (a Hugging Face base, BPE tokenizer)."""
    from sparsezo.export.gguf import export_gguf
    from sparsezo.model.load import load_model

    root = tmp_path_factory.mktemp("plan")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEZO_HOME", str(root / "home"))
    model, tok = bpe_model(), bpe_tokenizer()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "hf"), tok.save_pretrained(root / "hf")
    base, tok = load_model(root / "hf", "float32")
    delta, heavy = _concentrated_delta(base)
    info = {kind: export_gguf(base, tok, root / f"{kind}.gguf", delta, kind) for kind in ("q4_0", "q8_0", *MIXED)}
    yield {"root": root, "base": base, "tok": tok, "delta": delta, "heavy": heavy, "info": info}
    mp.undo()


def _file_types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("kind", list(MIXED))
def test_the_most_trained_tensors_and_the_output_layer_are_stored_at_8_bits(exported, kind):
    from sparsezo.export.gguf import gguf_tensor_name

    bulk = MIXED[kind][0]
    types = _file_types(exported["root"] / f"{kind}.gguf")
    config = exported["base"].config
    heavy = {gguf_tensor_name(config, n) for n in exported["heavy"]}
    assert {types[n] for n in heavy} == {"Q8_0"} and types["token_embd.weight"] == "Q8_0"
    light = [n for n, t in types.items() if n.endswith(".weight") and n not in heavy | {"token_embd.weight"}
             and t != "F32"]
    assert light and {types[n] for n in light} == {bulk}
    info = exported["info"][kind]
    assert info["tensor_types"]["Q8_0"] >= 3 and info["tensor_types"][bulk] == len(light)
    held = sum(exported["delta"].mask.indices[n].numel() for n in exported["heavy"])
    assert held / exported["delta"].mask.num_trainable >= KEEP_SHARE
    sizes = {k: v["bytes"] for k, v in exported["info"].items()}
    assert sizes["q4_0"] < sizes[kind] < sizes["q8_0"]


def _kept_share(exported, kind) -> float:
    """Share of trained entries whose value, as the file stores it (read by transformers), differs from the
    base's value stored in the same type."""
    from transformers import AutoModelForCausalLM

    from gguf_helpers import roundtrip
    from sparsezo.export.gguf import gguf_tensor_name

    root = exported["root"]
    got = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=f"{kind}.gguf", dtype=torch.float32).state_dict()
    types = _file_types(root / f"{kind}.gguf")
    changed = total = 0
    for name, idx in exported["delta"].mask.indices.items():
        stored_base = roundtrip(exported["base"].get_parameter(name), types[gguf_tensor_name(exported["base"].config,
                                                                                             name)])
        changed += int((got[name].reshape(-1)[idx] != stored_base.reshape(-1)[idx]).sum())
        total += idx.numel()
    return changed / total


def test_the_mixed_file_keeps_the_fine_tune_where_q4_0_loses_it(exported):
    """Read back by transformers (an independent reader): far more trained entries keep a changed value than at
    q4_0, and the logits sit closer to the merged model's."""
    from transformers import AutoModelForCausalLM

    kept = {kind: _kept_share(exported, kind) for kind in ("q4_0", "q8_0", *MIXED)}
    assert kept["q4_0"] < 0.6 and all(0.85 < kept[kind] <= kept["q8_0"] for kind in MIXED), kept
    merged = exported["base"]
    applied = exported["delta"].apply(merged)
    ids = exported["tok"](PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = merged(ids).logits
        err = {kind: float((AutoModelForCausalLM.from_pretrained(str(exported["root"]), gguf_file=f"{kind}.gguf",
                                                                 dtype=torch.float32)(ids).logits - want).abs().max())
               for kind in ("q4_0", *MIXED)}
    applied.remove()
    assert all(err[kind] < err["q4_0"] for kind in MIXED), err


def test_export_cli_writes_the_mixed_type(exported, capsys):
    """``sparsezo export --type q4_0+q8_0`` writes the same file as the function, marked 4-bit for llama.cpp."""
    import gguf

    from sparsezo.cli import main

    root = exported["root"]
    exported["delta"].meta.update(model=str(root / "hf"), dtype="float32")
    exported["delta"].save(root / "delta.safetensors")
    out = root / "cli.gguf"
    assert main(["export", "--format", "gguf", "--delta", str(root / "delta.safetensors"), "--out", str(out),
                 "--type", "q4_0+q8_0", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "q4_0+q8_0" and info["tensor_types"] == exported["info"]["q4_0+q8_0"]["tensor_types"]
    assert _file_types(out) == _file_types(root / "q4_0+q8_0.gguf")
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 2  # llama.cpp's "mostly Q4_0"
