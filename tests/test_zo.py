"""The ZO engine: SPSA is unbiased, perturbation is exactly undone, sparse steps stay sparse."""

import pytest
import torch
from torch import nn

from helpers import tiny_model
from sparsezo.masks import compute_mask
from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine, sample, step_seed


class Quadratic(nn.Module):
    """loss(w) = ||A w - b||² with w = the weight of a linear layer (inside 'layers.0.mlp')."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = nn.Linear(6, 4, bias=False)
        torch.manual_seed(1)
        self.x = torch.randn(32, 6)
        self.y = torch.randn(32, 4)
        self.requires_grad_(False)

    def loss(self):
        return ((self.layers[0].mlp(self.x) - self.y) ** 2).mean()


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_spsa_is_unbiased_gradient_estimator(dist):
    model = Quadratic()
    w = model.layers[0].mlp.weight
    with torch.enable_grad():
        w.requires_grad_(True)
        true_grad = torch.autograd.grad(model.loss(), w)[0].reshape(-1)
        w.requires_grad_(False)
    params = TrainableParams(model, compute_mask(model, "full"))
    engine = ZOEngine(params, ZOConfig(eps=1e-3, dist=dist, direction="sampled"), 1)
    est = torch.zeros_like(true_grad)
    n = 3000
    for i in range(n):
        seed = step_seed(7, i)
        lp, lm = engine.perturbed_losses(seed, lambda: model.loss().item())
        est += (lp - lm) / 2e-3 * engine.direction(seed, 0, params.numel)
    params.restore()
    cos = torch.nn.functional.cosine_similarity(est / n, true_grad, dim=0).item()
    assert cos > 0.9, cos
    # and it is not merely aligned: the scale is right too (E[z zᵀ] = I)
    assert (est / n).norm().item() == pytest.approx(true_grad.norm().item(), rel=0.15)


def test_noise_is_counter_based_and_chunking_invariant():
    for dist in ("gaussian", "rademacher"):
        whole = sample(123, 0, 5000, dist)
        parts = torch.cat([sample(123, 0, 1000, dist), sample(123, 1000, 5000, dist)])
        assert torch.equal(whole, parts)
        assert not torch.equal(whole, sample(124, 0, 5000, dist))
    r = sample(5, 0, 100_000, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 0.02
    g = sample(5, 0, 100_000, "gaussian")
    assert abs(g.mean().item()) < 0.02 and abs(g.std().item() - 1) < 0.02
    assert step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rule", ["full", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_then_restore_is_bit_identical(rule, dtype):
    model = tiny_model(dtype=dtype)
    before = _snapshot(model)
    params = TrainableParams(model, compute_mask(model, rule, 0.05, seed=3))
    engine = ZOEngine(params, ZOConfig(eps=1e-2), 1)
    changed = []

    def loss():
        changed.append(any(not torch.equal(before[k], v) for k, v in model.state_dict().items()))
        return 0.0

    engine.perturbed_losses(step_seed(0, 0), loss)
    params.restore()
    assert changed == [True, True]  # the forwards really saw perturbed weights
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_sparse_step_changes_exactly_the_masked_entries():
    model = tiny_model()
    before = _snapshot(model)
    mask = compute_mask(model, "random", 0.02, seed=1)
    params = TrainableParams(model, mask)
    engine = ZOEngine(params, ZOConfig(lr=1e-2, eps=1e-3), 1)
    x = torch.arange(12).view(2, 6)
    engine.step(0, lambda: model(input_ids=x).logits.float().pow(2).mean().item())
    after = model.state_dict()
    for name, old in before.items():
        diff = (after[name] != old).reshape(-1).nonzero().squeeze(1)
        expected = mask.indices.get(name)
        if expected is None:
            assert diff.numel() == 0, name
        else:
            assert torch.equal(diff, expected), name


def test_update_follows_the_applied_bf16_perturbation():
    """At ε=1e-3 bf16 rounding changes the applied perturbation a lot; the update must use what was applied."""
    model = tiny_model(dtype=torch.bfloat16)
    params = TrainableParams(model, compute_mask(model, "random", 0.2, seed=0))
    engine = ZOEngine(params, ZOConfig(eps=1e-3), 1)
    seen = []

    def loss():
        seen.append(torch.cat([p.detach().reshape(-1)[i].float() for p, i in zip(params.storage, params.indices)]))
        return 0.0

    seed = step_seed(0, 0)
    engine.perturbed_losses(seed, loss)
    applied = (seen[0] - seen[1]) * (1 / 2e-3)  # noise v2 divides by a scalar as × its reciprocal (zo/arith.py)
    d = engine.direction(seed, 0, params.numel)
    assert torch.equal(d, applied)
    z = sample(seed, 0, params.numel, "gaussian")
    rel_err = ((applied - z).norm() / z.norm()).item()
    assert rel_err > 0.01  # the silent bug this guards against is real at this ε (3-25% on real models)
    sampled = ZOEngine(params, ZOConfig(eps=1e-3, direction="sampled"), 1).direction(seed, 0, params.numel)
    assert torch.equal(sampled, z)


def test_non_finite_loss_raises_and_keeps_theta():
    from sparsezo.errors import SparseZOError

    model = tiny_model()
    params = TrainableParams(model, compute_mask(model, "random", 0.05))
    theta = params.theta.clone()
    engine = ZOEngine(params, ZOConfig(), 1)
    with pytest.raises(SparseZOError, match="non-finite"):
        engine.step(0, lambda: float("nan"))
    assert torch.equal(params.theta, theta)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "sign"])
def test_optimizers_descend_a_quadratic(opt):
    model = Quadratic()
    params = TrainableParams(model, compute_mask(model, "full"))
    lr = {"sgd": 0.02, "momentum": 0.005, "adam": 0.01, "sign": 0.003}[opt]
    engine = ZOEngine(params, ZOConfig(lr=lr, eps=1e-3, optimizer=opt, q=4), 300)
    start = model.loss().item()
    for t in range(300):
        engine.step(t, lambda: model.loss().item())
    assert model.loss().item() < 0.7 * start


@pytest.mark.parametrize("rule", ["full", "random"])
def test_read_returns_what_write_stored_across_tensor_boundaries(rule, monkeypatch):
    """``read`` is ``write``'s inverse up to the cast, for ranges that start and end inside tensors."""
    monkeypatch.setattr("sparsezo.zo.trainable.CHUNK", 37)  # odd chunks straddle every tensor boundary
    model = tiny_model(dtype=torch.bfloat16)
    params = TrainableParams(model, compute_mask(model, rule, 0.1, seed=3))
    values = torch.randn(params.numel)
    for s, e in params.blocks():
        params.write(values[s:e], s)
    got = torch.cat([params.read(s, e) for s, e in params.blocks()])
    assert got.dtype == torch.bfloat16 and torch.equal(got, values.to(torch.bfloat16))
    assert not torch.equal(got.float(), params.theta)  # the weights changed, θ did not


def test_all_finite_matches_isfinite_including_an_overflowing_sum():
    from sparsezo.zo.spsa import all_finite

    big = torch.full((8,), 3e38)  # every entry finite, their sum is not
    for x in (torch.ones(5), big, torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), -float("inf")])):
        assert all_finite(x) == bool(torch.isfinite(x).all())


@pytest.mark.parametrize("rule", ["full", "random"])
def test_cached_noise_fast_path_is_bit_identical_to_regenerating(rule):
    """Keeping z within a step (fast path) must not change a single bit of θ or the weights."""
    results = []
    for cache in (1 << 30, 0):
        model = tiny_model(dtype=torch.bfloat16)
        params = TrainableParams(model, compute_mask(model, rule, 0.1, seed=2))
        engine = ZOEngine(params, ZOConfig(lr=1e-2, eps=1e-2, q=2, optimizer="adam"), 5, cache_bytes=cache)
        assert engine.cache_z == bool(cache)
        x = torch.arange(12).view(2, 6)
        for t in range(3):
            engine.step(t, lambda: model(input_ids=x).logits.float().pow(2).mean().item())
        assert not engine._z and not engine._d  # nothing kept across steps
        results.append((params.theta.clone(), {k: v.clone() for k, v in model.state_dict().items()}))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
