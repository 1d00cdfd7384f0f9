"""Length-bucketed evaluation batches: same predictions as input-order batches, less padding."""

import pytest
import torch

from helpers import sentences, tiny_model, tiny_tokenizer
from sparsezo.masks import compute_mask
from sparsezo.eval.scoring import (batch_loss, encode, eval_chunks, make_batch, micro_batch_chunks, micro_batch_loss,
                                   micro_batches, padding_fraction, padding_fraction_of, predict)
from sparsezo.tasks import Example
from sparsezo import TrainConfig, fine_tune
from sparsezo.zo import TrainableParams, ZOConfig
from sparsezo.zo.fused import PMLoss


def _examples(n=40, seed=3):
    ex = []
    for i, (y, t) in enumerate(sentences(n, seed)):
        words = " ".join([t] * (1 + i % 5))  # lengths 1x .. 5x, interleaved
        cands = [" terrible", " great"] if i % 3 else [" terrible It was", " great"]  # some multi-token candidates
        ex.append(Example(f"{words} It was", cands, y))
    return ex


def test_bucketed_predictions_equal_input_order_predictions_with_less_padding():
    model, tok, ex = tiny_model(), tiny_tokenizer(), _examples()
    bucketed = predict(model, tok, ex, batch_size=8)
    assert torch.equal(bucketed, predict(model, tok, ex, batch_size=8, bucketed=False))
    assert torch.equal(bucketed, torch.cat([predict(model, tok, [e], batch_size=1) for e in ex]))  # input order kept
    assert padding_fraction(tok, ex, 8) < 0.5 * padding_fraction(tok, ex, 8, bucketed=False)
    chunks = eval_chunks(encode(tok, ex), 8)
    assert sorted(i for c in chunks for i in c) == list(range(len(ex))) and max(map(len, chunks)) == 8


def _step(tok, single_token=True, n=16, seed=4):
    ex = _examples(n, seed)
    if single_token:
        ex = [Example(e.prompt, [" terrible", " great"], e.gold) for e in ex]
    return encode(tok, ex)


@pytest.mark.parametrize("single_token", [True, False])
def test_micro_batches_hold_each_example_once_sorted_with_less_padding(single_token):
    tok = tiny_tokenizer()
    enc = _step(tok, single_token)
    chunks = micro_batch_chunks(enc)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(len(enc)))  # the same examples, each once
    lengths = [len(enc[i].prompt) for i in flat]
    assert lengths == sorted(lengths) and len(chunks) > 1
    assert micro_batch_chunks(enc) == chunks  # deterministic
    assert micro_batch_chunks(enc, overhead=10**9) == [flat]  # a forward costing more than any padding: one batch
    pad = tok.pad_token_id
    one_batch = padding_fraction_of(micro_batches(enc, pad, bucketed=False))
    assert padding_fraction_of(micro_batches(enc, pad)) < 0.5 * one_batch


@pytest.mark.parametrize("kind", ["ce", "lm", "acc"])
@pytest.mark.parametrize("single_token", [True, False])
def test_bucketed_step_loss_equals_the_one_batch_loss(kind, single_token):
    model, tok = tiny_model(), tiny_tokenizer()
    enc = _step(tok, single_token)
    whole = batch_loss(model, make_batch(enc, tok.pad_token_id), kind)
    parts = micro_batches(enc, tok.pad_token_id)
    assert len(parts) > 1
    assert micro_batch_loss(model, parts, kind) == pytest.approx(whole, rel=1e-5, abs=1e-6)
    loss = PMLoss(model, parts, kind)
    plus, minus = loss.pair()  # the doubled forward without ±ε hooks: both halves are the step's loss
    assert loss() == pytest.approx(whole, rel=1e-5, abs=1e-6)
    assert plus == pytest.approx(whole, rel=1e-5, abs=1e-6) and minus == pytest.approx(whole, rel=1e-5, abs=1e-6)
    assert loss.max_tokens < make_batch(enc, tok.pad_token_id).input_ids.numel()


def test_training_with_bucketed_steps_follows_the_one_batch_run():
    def run(bucket):
        model, tok = tiny_model(), tiny_tokenizer()
        params = TrainableParams(model, compute_mask(model, "random", 0.1, seed=1))
        cfg = TrainConfig(steps=4, batch_size=16, eval_every=4, bucket=bucket, zo=ZOConfig(lr=1e-2, eps=1e-2, seed=0))
        res = fine_tune(model, tok, params, _examples(64, 5), _examples(16, 6), cfg, progress=False)
        return [r["loss"] for r in res.history if "loss" in r], params.theta.clone()

    losses, theta = run(True)
    losses_again, theta_again = run(True)
    assert losses == losses_again and theta.equal(theta_again)  # deterministic
    one_batch, theta_one = run(False)
    assert len(losses) == 4 and losses == pytest.approx(one_batch, rel=1e-4)  # the same examples, summed otherwise
    assert torch.allclose(theta, theta_one, rtol=1e-3, atol=1e-5)
