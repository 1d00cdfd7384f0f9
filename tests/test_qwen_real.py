"""The real Qwen2.5-Coder-0.5B-Instruct (qwen2; 494 M parameters, 630 M as this GGUF stores it): conversion,
eval and ZO steps at fp32.

Slow (about 2 minutes on one thread once converted; the first conversion adds about 2 minutes), so
marked ``slow``: run with ``pytest --run-slow tests/test_qwen_real.py``. Skips with how to fetch the
file when it is absent (``python benchmarks/qwen.py``); the tiny Qwen2 in tests/test_qwen.py covers
every stage in the default suite.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsezo.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    """The GGUF file converted (once, cached by content in $SPARSEZO_HOME) and loaded in fp32."""
    from sparsezo.gguf_import import converted_folder
    from sparsezo import load_model

    folder = converted_folder(qwen_gguf)
    model, tok = load_model(folder, "float32")
    return {"gguf": qwen_gguf, "folder": folder, "model": model, "tok": tok}


def test_conversion_keeps_the_qwen2_architecture_and_its_separate_output_head(qwen):
    """The Hugging Face release ties the 151,936 × 896 embedding; this GGUF stores the head on its own
    (output.weight Q8_0 next to token_embd Q5_0, different roundings), so the conversion is untied and
    holds 630 M weights, not 494 M, and the memory estimate must count both matrices."""
    from sparsezo.model.memory import resident_bytes

    model, cfg = qwen["model"], qwen["model"].config
    assert cfg.model_type == "qwen2" and not cfg.tie_word_embeddings
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (24, 896, 4864, 151936)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)
    assert (head - embed).abs().max() < 0.1 * embed.abs().max()  # the same matrix, rounded two ways
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")) and attn.o_proj.bias is None
    assert attn.q_proj.bias.abs().max() > 0  # the biases came over from the file, not a zero init
    numel = sum(p.numel() for p in model.parameters())
    assert numel == 494_032_768 + 151_936 * 896
    # the folder is bf16: an fp32 load casts every tensor (counted), a bf16 load maps them (not counted)
    assert resident_bytes(qwen["folder"], "float32") - resident_bytes(qwen["folder"], "bfloat16") == 4 * numel


def test_zero_shot_eval_and_a_few_zo_steps_replay_exactly(qwen, assets, tmp_path, capsys):
    common = ["--model", str(qwen["gguf"]), "--task", "sst2", "--dtype", "float32"]
    assert main(["eval", *common, "--num-test", "16", "--eval-batch-size", "16", "--json"]) == 0
    zero_shot = json.loads(capsys.readouterr().out)
    assert zero_shot["n"] == 16 and 0 <= zero_shot["value"] <= 1
    run = tmp_path / "run"
    assert main(["train", *common, "--mask", "random", "--density", "0.001", "--steps", "2", "--batch-size", "4",
                 "--num-train", "8", "--num-dev", "4", "--num-test", "4", "--eval-every", "2", "--eval-batch-size", "4",
                 "--lr", "1e-4", "--out", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)  # a real LM's CE on two candidates, not nan/inf
    eligible = 24 * (2 * 896 * 896 + 2 * 128 * 896 + 3 * 896 * 4864)  # q, o; k, v (2 KV heads of 64); MLP
    assert result["num_trainable"] == round(0.001 * eligible)
    assert main(["replay", str(run), "--out", str(tmp_path / "replayed.safetensors")]) == 0
    from safetensors.torch import load_file

    want, got = load_file(run / "delta.safetensors"), load_file(tmp_path / "replayed.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
