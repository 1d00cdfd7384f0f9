"""Candidate scoring: batched, padded, logits only where needed — equal to a naive loop."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model, tiny_tokenizer
from sparsezo.eval.scoring import candidate_logprobs, encode, make_batch
from sparsezo.tasks import Example


def _naive(model, tok, ex):
    out = []
    prompt = tok(ex.prompt)["input_ids"]
    for c in ex.candidates:
        cand = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + cand])
        logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        out.append(sum(logp[len(prompt) - 1 + t, tok_id].item() for t, tok_id in enumerate(cand)))
    return out


EXAMPLES = [
    Example("the movie was good It", [" was great", " was terrible"], 0),
    Example("a plot", [" good", " bad", " very dull film"], 2),
    Example("the cast and the story and the film was quite", [" fun"], 0),
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("examples", [EXAMPLES, [Example("a film was", [" good", " bad"], 1), Example("the", [" fun", " dull"], 0)]])
def test_batched_scores_equal_naive_loop(side, examples):
    model, tok = tiny_model(), tiny_tokenizer()
    batch = make_batch(encode(tok, examples), tok.pad_token_id, padding_side=side)
    got = candidate_logprobs(model, batch)
    for i, ex in enumerate(examples):
        ref = _naive(model, tok, ex)
        assert got[i, : len(ref)].tolist() == pytest.approx(ref, abs=1e-5)
        assert torch.isinf(got[i, len(ref):]).all()


def test_mean_scores_divide_by_candidate_length():
    model, tok = tiny_model(), tiny_tokenizer()
    batch = make_batch(encode(tok, EXAMPLES[1:2]), tok.pad_token_id)
    s, m = candidate_logprobs(model, batch), candidate_logprobs(model, batch, mean=True)
    assert m[0].tolist() == pytest.approx([s[0, 0].item(), s[0, 1].item(), s[0, 2].item() / 3], abs=1e-6)


def test_long_prompts_are_cut_from_the_left_and_reported(caplog):
    tok = tiny_tokenizer()
    ex = Example(" ".join(["the"] * 50 + ["good"]), [" fun film"], 0)
    short = Example("the good", [" fun film"], 0)
    with caplog.at_level("WARNING", logger="sparsezo"):
        enc = encode(tok, [ex, short], max_length=10)
        encode(tok, [ex, short], max_length=10)  # the same split again: reported once
    assert len(enc[0].prompt) + 2 == 10 and enc[0].prompt[-1] == tok.convert_tokens_to_ids("good")
    assert enc[1].prompt == tok("the good")["input_ids"]
    warnings = [r.getMessage() for r in caplog.records if "were cut from the left" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 2 prompts exceed 10 tokens" in warnings[0]


def test_acc_loss_is_one_minus_batch_accuracy():
    from sparsezo.eval.scoring import LOSSES, batch_loss

    model, tok = tiny_model(), tiny_tokenizer()
    examples = EXAMPLES + [Example("a film was", [" good", " bad"], 1), Example("the", [" fun", " dull"], 0)]
    batch = make_batch(encode(tok, examples), tok.pad_token_id)
    preds = candidate_logprobs(model, batch).argmax(1).tolist()
    right = sum(p == e.gold for p, e in zip(preds, examples))
    assert "acc" in LOSSES and 0 < right < len(examples)  # a mixed batch, so the check means something
    assert batch_loss(model, batch, "acc") == pytest.approx(1 - right / len(examples))
