"""CUDA-graph forwards: bucketing on any machine, graph = eager (also after a ZO perturbation) on a GPU."""

import pytest
import torch

from sparsezo.eval.graphs import GraphedForward, bucket
from sparsezo.masks import compute_mask
from sparsezo.testing import tiny_llama
from sparsezo.zo import TrainableParams


def test_buckets_are_powers_of_two_from_32():
    assert [bucket(t) for t in (1, 31, 32, 33, 64, 65, 256)] == [32, 32, 32, 64, 64, 128, 256]


def test_without_cuda_the_forward_stays_eager_and_says_why():
    model = tiny_llama(seed=0)
    f = GraphedForward(model)
    ids = torch.randint(3, 100, (2, 20))
    mask = torch.ones_like(ids)
    assert "no CUDA graphs" in f.reason
    assert torch.equal(f(ids, mask), model(input_ids=ids, attention_mask=mask).logits.detach())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; run on a GPU machine")
def test_graphed_forward_sees_in_place_perturbations():
    model = tiny_llama(seed=0).to("cuda")
    f = GraphedForward(model)
    ids = torch.randint(3, 100, (1, 32), device="cuda")
    mask = torch.ones_like(ids)
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=0))
    before = f(ids, mask).clone()
    assert f.reason is None, f.reason
    params.write(params.theta + 0.1)  # what a ZO perturbation does: the trainable entries rewritten in place
    after = f(ids, mask).clone()
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, f.eager(ids, mask), rtol=1e-4, atol=1e-4)
