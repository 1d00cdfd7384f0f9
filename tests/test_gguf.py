"""GGUF in (--model FILE.gguf, streaming conversion, cache) and out (export --format gguf), checked against
transformers' own GGUF loader as the independent reader; llama.cpp itself: benchmarks/gguf_roundtrip.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from gguf_helpers import bpe_model, bpe_tokenizer, roundtrip, write_tiny_gguf
from helpers import write_sst2
from sparsezo.errors import SparseZOError

PROMPT = " the movie was good and the plot is fun"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama as a GGUF file with F32, F16 and Q8_0 tensors, plus the model it was written from."""
    root = tmp_path_factory.mktemp("gguf")
    model, tok = bpe_model(), bpe_tokenizer()
    path = write_tiny_gguf(root / "tiny.gguf", model, tok, {"attn_q": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q4_1",
                                                             "ffn": "F16"})  # the default model's types and more
    return {"root": root, "path": path, "model": model, "tok": tok}


def _transformers_gguf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)


def test_streaming_conversion_equals_transformers_fp32_loader(tiny, tmp_path):
    """Bit-identical weights to from_pretrained(gguf_file=) (which de-permutes Q/K), for every tensor type;
    the F32 tensors equal the original model's, so the permutation round trip is exact."""
    from safetensors.torch import load_file

    from sparsezo.model.gguf_import import convert_gguf

    convert_gguf(tiny["path"], tmp_path / "conv", torch.float32)
    ours = load_file(tmp_path / "conv" / "model.safetensors")
    ref = _transformers_gguf(tiny["path"]).state_dict()
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied head stored once, as save_pretrained does
    for name, t in ours.items():
        assert torch.equal(t, ref[name]), name
    original = tiny["model"].state_dict()
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.embed_tokens.weight"):
        assert torch.equal(ours[name], original[name]), name
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])  # Q8_0: rounded, as in the file
    config = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    meta = json.loads((tmp_path / "conv" / "gguf_metadata.json").read_text())
    assert meta["tokenizer.ggml.model"]["value"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]["value"]) == 300


def test_default_model_is_converted_by_the_streaming_converter_in_fp32(tiny, tmp_path, monkeypatch):
    """The embedded default model goes through the same converter (its GGUF stands in for the download):
    fp32 weights bit-identical to transformers' fp32 GGUF loader, which converted it before."""
    from safetensors.torch import load_file

    from sparsezo.model import paths, resolve

    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(resolve, "fetch_default_gguf", lambda folder: tiny["path"])
    folder = resolve.default_model_path()
    assert folder == tmp_path / "home" / "models" / paths.DEFAULT_MODEL
    ours = load_file(folder / "model.safetensors")
    ref = _transformers_gguf(tiny["path"]).state_dict()
    assert all(t.dtype == torch.float32 and torch.equal(t, ref[n]) for n, t in ours.items())
    assert (folder / "gguf_metadata.json").is_file()


def test_model_path_converts_once_and_caches_by_content(tiny, tmp_path, monkeypatch):
    from sparsezo.model import gguf_import
    from sparsezo.model.load import load_model
    from sparsezo.model.resolve import resolve_model_path

    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path / "home"))
    folder = resolve_model_path(tiny["path"])
    assert folder.parent == tmp_path / "home" / "gguf" and folder.name.endswith("-bf16")
    assert folder.name.startswith(gguf_import.file_sha256(tiny["path"]))
    model, tok = load_model(tiny["path"], "float32")
    assert tok(PROMPT).input_ids == tiny["tok"](PROMPT).input_ids
    assert model.model.embed_tokens.weight.dtype == torch.float32

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "convert_gguf", no_conversion)
    copy = tmp_path / "copy" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny["path"], copy)
    assert resolve_model_path(copy) == folder  # same content, other name: the cache is reused
    assert resolve_model_path(copy.parent) == folder  # a folder holding one .gguf
    shutil.copy(tiny["path"], copy.parent / "second.gguf")
    with pytest.raises(SparseZOError, match="holds 2 GGUF files"):
        resolve_model_path(copy.parent)


def test_unsupported_or_broken_gguf_fails_with_one_clear_line(tiny, tmp_path, monkeypatch, capsys):
    import gguf

    from sparsezo.cli import main

    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path / "home"))
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert main(["bench", "--model", str(tmp_path / "bert.gguf"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "architecture bert" in err[0] and "not supported" in err[0]
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    assert main(["bench", "--model", str(tmp_path / "junk.gguf"), "--steps", "1"]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path / "missing.gguf"), "--steps", "1"]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A short CLI fine-tune on the GGUF file itself (the on-device loop's first half)."""
    from sparsezo.cli import main

    root = tmp_path_factory.mktemp("gguf-run")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEZO_HOME", str(root / "home"))
    out = root / "run"
    assert main(["train", "--model", str(tiny["path"]), "--data-dir", str(write_sst2(root / "sst2")),
                 "--dtype", "float32", "--mask", "random", "--density", "0.05", "--steps", "6", "--eval-every", "3",
                 "--num-train", "32", "--num-dev", "8", "--num-test", "8", "--lr", "0.3", "--eps", "1e-3",
                 "--keep-last", "--out", str(out)]) == 0
    yield {"run": out, "root": root}
    mp.undo()


def _merged(run_dir, apply: bool = True):
    """sparsezo's own merged model in fp32: the run's base with the delta applied (or not), and its tokenizer."""
    from sparsezo.training.checkpoint import load_delta
    from sparsezo.model.load import load_model

    delta = load_delta(run_dir)
    model, tok = load_model(delta.meta["model"], "float32")
    if apply:
        delta.apply(model)
    return model, tok, delta


@pytest.mark.parametrize("kind,qtype,tol", [("f32", "F32", 1e-5), ("f16", "F16", 1e-4), ("q8_0", "Q8_0", 1e-4)])
def test_export_gguf_matches_the_merged_model_within_the_type(run, tiny, kind, qtype, tol, capsys):
    """transformers reads the exported file back: its logits equal the merged model's with each weight
    stored in the export type (so only the type's rounding separates them), and the fine-tune is in it."""
    import gguf
    from transformers import AutoModelForCausalLM

    from sparsezo.cli import main

    out = run["root"] / f"model-{kind}.gguf"
    assert main(["export", "--format", "gguf", "--delta", str(run["run"]), "--out", str(out), "--type", kind,
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == out.stat().st_size and info["tokenizer"] == "copied from the base's GGUF"
    model, tok, delta = _merged(run["run"])
    base, _, _ = _merged(run["run"], apply=False)
    ref = {n: roundtrip(t, qtype if n != "lm_head.weight" else "F32") for n, t in model.state_dict().items()}
    ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    stored = AutoModelForCausalLM.from_config(model.config).eval()
    stored.load_state_dict(ref)
    got = _transformers_gguf(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        exported, expected, merged, before = got(ids).logits, stored(ids).logits, model(ids).logits, base(ids).logits
    assert (exported - expected).abs().max() < tol
    if kind != "q8_0":  # 16 bits and more keep the fine-tune's effect far above the storage error
        assert (exported - merged).abs().max() < 0.1 * (merged - before).abs().max()
    src, dst = gguf.GGUFReader(str(tiny["path"])), gguf.GGUFReader(str(out))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model", "llama.attention.head_count_kv"):
        assert dst.fields[key].contents() == src.fields[key].contents(), key
    assert dst.fields["general.file_type"].contents() == {"f32": 0, "f16": 1, "q8_0": 7}[kind]


def _tiny(model_type: str, vocab: int):
    """A random tiny model of an architecture GGUF export writes (Qwen2: q/k/v biases; Qwen3: q/k norms and
    a head_dim that is not hidden/heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"qwen3": {"head_dim": 128}, "qwen3-hd16": {"head_dim": 16}}.get(model_type, {})
    cfg = AutoConfig.for_model(model_type.split("-")[0], vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=model_type != "mistral", **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and norms away from their 0 / 1 initialisation
    return model


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "qwen3-hd16"])
def test_export_gguf_from_a_hf_base_and_back(tmp_path, monkeypatch, model_type):
    """A base that never was GGUF, per exportable architecture: transformers reads the export back with equal
    logits; the byte-level BPE tokenizer becomes llama.cpp's gpt2 vocabulary with the same token ids; and
    sparsezo's own GGUF import of the export gives the base's weights back."""
    from transformers import AutoTokenizer

    from sparsezo.export.gguf import export_gguf
    from sparsezo.model.load import load_model

    monkeypatch.setenv("SPARSEZO_HOME", str(tmp_path / "home"))
    tok = bpe_tokenizer()
    model = _tiny(model_type, len(tok))
    model.save_pretrained(tmp_path / "hf"), tok.save_pretrained(tmp_path / "hf")
    loaded, loaded_tok = load_model(tmp_path / "hf", "float32")
    info = export_gguf(loaded, loaded_tok, tmp_path / "out.gguf", None, "f32")
    assert info["tokenizer"] == "Hugging Face BPE"
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="out.gguf")
    assert back(PROMPT).input_ids == tok(PROMPT).input_ids
    ids = tok(PROMPT, return_tensors="pt").input_ids
    again, _ = load_model(tmp_path / "out.gguf", "float32")  # --model FILE.gguf (stored bf16)
    with torch.no_grad():
        want = loaded(ids).logits
        if model_type != "qwen3-hd16":  # transformers ignores qwen3.attention.key_length (assumes 128)
            assert (_transformers_gguf(tmp_path / "out.gguf")(ids).logits - want).abs().max() < 1e-5
        # llama.cpp stores Mistral as "llama" (the same network), so it comes back as a Llama
        assert type(again).__name__ == {"mistral": "LlamaForCausalLM"}.get(model_type, type(loaded).__name__)
        for name, t in loaded.state_dict().items():
            assert torch.equal(again.state_dict()[name], t.to(torch.bfloat16).float()), name


def test_export_gguf_shows_a_progress_bar_and_none_of_the_gguf_library_chatter(run, tmp_path):
    """A separate process, logging set up as a user's shell gets it: stdout is export's one result line,
    stderr its progress bar over the bytes written, and none of the gguf library's own INFO lines ("gguf: This GGUF
    file is for Little Endian only", "Writing the following files:", the temporary file's path)."""
    out = tmp_path / "quiet.gguf"
    env = dict(os.environ, SPARSEZO_HOME=str(run["root"] / "home"))
    proc = subprocess.run([sys.executable, "-m", "sparsezo", "export", "--format", "gguf", "--delta", str(run["run"]),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and proc.stdout.startswith("GGUF (f16): ")
    assert proc.stdout.strip().endswith(f"-> {out}") and out.is_file()
    for chatter in ("gguf:", "Endian", "Writing the following files", "n_tensors", ".quiet.gguf."):
        assert chatter not in proc.stderr, proc.stderr
    assert re.search(r"(?:^|[\r\n])export: +\d+%\|.*/[\d.]+k? \[.*B/s\]", proc.stderr), proc.stderr  # bytes, with a rate


def test_export_refuses_what_it_cannot_write(run, tmp_path, capsys):
    from sparsezo.cli import main

    assert main(["export", "--format", "peft", "--delta", str(run["run"]), "--out", str(tmp_path / "a"),
                 "--type", "q8_0"]) == 2
    assert "--type q8_0 applies to --format gguf only" in capsys.readouterr().err
    (tmp_path / "exists.gguf").write_text("")
    assert main(["export", "--format", "gguf", "--delta", str(run["run"]), "--out", str(tmp_path / "exists.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_tensorboard_logs_loss_grad_lr_and_dev(tiny, run, tmp_path, monkeypatch):
    """--tensorboard mirrors metrics.jsonl; without the package the flag fails before any work."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparsezo import tensorboard as tb
    from sparsezo.cli import main

    monkeypatch.setenv("SPARSEZO_HOME", str(run["root"] / "home"))
    args = ["train", "--model", str(tiny["path"]), "--data-dir", str(run["root"] / "sst2"), "--dtype", "float32",
            "--mask", "random", "--density", "0.05", "--steps", "4", "--eval-every", "2", "--num-train", "32",
            "--num-dev", "8", "--num-test", "8", "--lr", "0.3", "--eps", "1e-3"]
    assert main([*args, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["dev/accuracy", "dev/loss", "train/loss", "train/lr", "train/projected_grad"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)
    assert [e.step for e in events.Scalars("dev/accuracy")] == [0, 2, 4]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(SparseZOError, match="pip install 'sparsezo\\[tensorboard\\]'"):
        tb.require_tensorboard()
    assert main([*args, "--out", str(tmp_path / "run2"), "--tensorboard", str(tmp_path / "tb2")]) == 2
    assert not (tmp_path / "run2").exists()
