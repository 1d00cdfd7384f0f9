"""CUDA-graph decoder forwards (--cuda-graphs): bucketing and padding on any machine, the eager fallback
and a byte-identical CPU run, and (on a GPU) graph = eager, also after a ZO perturbation."""

import json
import logging

import pytest
import torch

from helpers import WORDS, save_tiny_model, sentences, tiny_tokenizer, write_sst2
from sparsezo.cli import main
from sparsezo.eval.graphs import Bucket, GraphedDecoder, bucket
from sparsezo.eval.scoring import (batch_loss, candidate_logprobs, decoder_states, encode, make_batch, micro_batch_loss,
                                   micro_batches)
from sparsezo.masks import compute_mask
from sparsezo.tasks import Example
from sparsezo.testing import tiny_llama
from sparsezo.training.checkpoint import load_delta
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine, step_seed
from sparsezo.zo.fused import PMLoss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; run on a GPU machine")


def _examples(n: int, seed: int) -> list[Example]:
    """Sentiment examples of two lengths (1 and 6 sentences), so a step splits into micro-batches of two shapes."""
    return [Example(f"{' '.join([t] * (1 + 5 * (i % 2)))} It was", [" terrible", " great"], y)
            for i, (y, t) in enumerate(sentences(n, seed))]


def _model(device: str = "cpu"):
    return tiny_llama(vocab_size=len(WORDS), hidden=64, layers=2).to(device)


def _batch(model, sizes=(5, 9, 3)):
    """Rows of different lengths, right-padded as training lays them out."""
    tok = tiny_tokenizer()
    enc = encode(tok, [Example(" ".join(["good movie"] * n) + " It was", [" terrible", " great"], 1) for n in sizes])
    return make_batch(enc, tok.pad_token_id, device=next(model.parameters()).device)


def test_buckets_are_powers_of_two_from_32_and_rows_powers_of_two_up_to_the_cap():
    assert [bucket(t) for t in (1, 31, 32, 33, 64, 65, 256)] == [32, 32, 32, 64, 64, 128, 256]
    assert [bucket(r, 1) for r in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    g = GraphedDecoder(_model(), max_rows=12, max_tokens=100)
    assert g.shape(3, 20) == (4, 32) and g.shape(1, 33) == (1, 64)
    assert g.shape(9, 65) == (12, 100)  # buckets are capped at the limits
    assert g.shape(13, 10) is None and g.shape(1, 101) is None  # beyond them: eager


def test_without_cuda_the_decoder_stays_eager_and_says_why():
    model = _model()
    g = GraphedDecoder(model)
    batch = _batch(model)
    assert g.reason == "no CUDA graphs on cpu"
    assert torch.equal(g(batch), decoder_states(model, batch)) and not g.graphs
    assert torch.equal(candidate_logprobs(model, batch, forward=g), candidate_logprobs(model, batch))
    assert batch_loss(model, batch, "lm", forward=g) == batch_loss(model, batch, "lm")
    two = [batch, _batch(model, (2, 2))]
    assert micro_batch_loss(model, two, forward=g) == micro_batch_loss(model, two)


def test_a_bucket_pads_real_rows_and_adds_dummy_rows_without_changing_the_real_positions():
    """What a graph replays, run eagerly: padded columns attention 0 / position 0, dummy rows attend everywhere,
    and the hidden states at real positions are those of the unpadded forward (to float rounding)."""
    model = _model()
    batch = _batch(model)
    rows, width = batch.input_ids.shape
    b = Bucket(model.get_decoder(), 4, 32, torch.device("cpu"))
    b.mask.zero_()  # left over from another batch
    b.pos.fill_(7)
    b.load(batch)
    assert torch.equal(b.ids[:rows, :width], batch.input_ids) and not b.ids[:, width:].any() and not b.ids[rows:].any()
    assert torch.equal(b.mask[:rows, :width], batch.attention_mask) and not b.mask[:rows, width:].any()
    assert torch.equal(b.pos[:rows, :width], batch.position_ids) and not b.pos[:, width:].any()
    assert b.mask[rows:].all()
    with torch.no_grad():
        padded = b.forward()[:rows, :width]
    real = batch.attention_mask.bool()
    eager = decoder_states(model, batch)
    torch.testing.assert_close(padded[real], eager[real], rtol=1e-5, atol=1e-5)


def _zo_losses(device: str) -> tuple[list, list, GraphedDecoder]:
    """L± of three ZO queries on a micro-batched step (two shapes), eagerly and through a GraphedDecoder."""
    model = _model(device)
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
    tok = tiny_tokenizer()
    batches = micro_batches(encode(tok, _examples(8, 1)), tok.pad_token_id, device)
    assert len({b.input_ids.shape for b in batches}) >= 2
    g = GraphedDecoder(model)
    out = []
    for forward in (None, g):
        loss, cfg = PMLoss(model, batches, forward=forward), ZOConfig(eps=1e-2)
        losses = []
        for step in range(3):
            losses.append(ZOEngine(params, cfg, 1).perturbed_losses(step_seed(0, step), loss))
            params.restore()
        out.append(losses)
    return out[0], out[1], g


def test_a_zo_step_through_the_graphed_decoder_is_the_eager_one_on_cpu():
    eager, graphed, g = _zo_losses("cpu")
    assert graphed == eager and all(lp != lm for lp, lm in eager) and g.reason is not None


def test_cuda_graphs_on_cpu_warn_once_and_train_byte_identically(caplog):
    tok = tiny_tokenizer()
    runs = {}
    for flag in (False, True):
        model = _model()
        params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
        cfg = TrainConfig(steps=4, eval_every=2, batch_size=4, keep_best=False, cuda_graphs=flag,
                          zo=ZOConfig(lr=0.05, eps=1e-2))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sparsezo"):
            res = fine_tune(model, tok, params, _examples(16, 1), _examples(4, 2), cfg, progress=False)
        runs[flag] = (res.trajectory.grads, res.trajectory.seeds, params.theta.clone(), res.history)
        warned = [r.getMessage() for r in caplog.records if "--cuda-graphs" in r.getMessage()]
        assert warned == (["warning: --cuda-graphs has no effect off CUDA (the model is on cpu); training eagerly"]
                          if flag else [])
    (grads, seeds, theta, history), (grads2, seeds2, theta2, history2) = runs[False], runs[True]
    assert grads == grads2 and seeds == seeds2 and torch.equal(theta, theta2) and history == history2
    assert len({tuple(g) for g in grads}) > 1  # it trained


def test_cuda_graphs_is_recorded_and_kept_by_resume(tmp_path, capsys):
    model, data, out = save_tiny_model(tmp_path / "model"), write_sst2(tmp_path / "sst2"), tmp_path / "run"
    common = ["--model", str(model), "--data-dir", str(data), "--dtype", "float32", "--mask", "random", "--density",
              "0.05", "--steps", "2", "--eval-every", "2", "--num-train", "16", "--num-dev", "8", "--num-test", "8",
              "--lr", "1e-2", "--checkpoint-every", "1"]
    assert main(["train", *common, "--cuda-graphs", "--out", str(out)]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["cuda_graphs"] is True and config["train"]["cuda_graphs"] is True
    plain = tmp_path / "plain"
    assert main(["train", *common, "--out", str(plain)]) == 0
    assert json.loads((plain / "config.json").read_text())["train"]["cuda_graphs"] is False
    first, other = load_delta(out), load_delta(plain)
    assert all(torch.equal(first.values[k], other.values[k]) for k in other.values)  # no effect on CPU
    (out / "delta.safetensors").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--cuda-graphs"]) == 2  # the setting comes from the run
    assert "drop --cuda-graphs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 0, capsys.readouterr().err
    assert load_delta(out).meta["train"]["cuda_graphs"] is True
    assert json.loads((out / "config.json").read_text())["args"]["cuda_graphs"] is True


@pytest.mark.cuda
@cuda
def test_graphed_decoder_sees_in_place_perturbations():
    model = _model("cuda")
    g = GraphedDecoder(model)
    batch = _batch(model)
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=0))
    before = g(batch).clone()
    assert g.reason is None, g.reason
    assert list(g.graphs) == [(4, 32)]
    params.write(params.theta + 0.1)  # what a ZO perturbation does: the trainable entries rewritten in place
    after = g(batch).clone()
    assert not torch.equal(before, after)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(after[real], g.eager(batch)[real], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@cuda
def test_a_graphed_micro_batched_zo_step_matches_the_eager_one():
    eager, graphed, g = _zo_losses("cuda")
    assert g.reason is None, g.reason
    assert len(g.graphs) >= 2  # one graph per bucket of the step's micro-batches, sharing a memory pool
    assert all(lp != lm for lp, lm in graphed)  # the replays read the perturbed weights
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-4, atol=1e-5)
