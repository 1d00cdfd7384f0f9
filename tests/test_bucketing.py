"""Length-bucketed evaluation batches: same predictions as input-order batches, less padding."""

import torch

from helpers import sentences, tiny_model, tiny_tokenizer
from sparsezo.eval.scoring import eval_chunks, encode, padding_fraction, predict
from sparsezo.tasks import Example


def _examples():
    ex = []
    for i, (y, t) in enumerate(sentences(40, 3)):
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
