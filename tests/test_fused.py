"""Fused ±ε forward: L+ and L− from one pass over the stacked batch equal two separate forwards."""

import pytest
import torch

from helpers import WORDS, sentences, tiny_tokenizer
from sparsezo.bench import synthetic_batch
from sparsezo.errors import SparseZOError
from sparsezo.masks import compute_mask
from sparsezo.testing import tiny_llama
from sparsezo.quant import int4
from sparsezo.quant.convert import quantize_model
from sparsezo.zo import TrainableParams, ZOConfig, ZOEngine, step_seed
from sparsezo.zo.fused import FusedPM, PMLoss


def _setup(dtype, quant=None, rule="random"):
    model = tiny_llama(vocab_size=len(WORDS), hidden=64, layers=2, dtype=dtype)
    mask = compute_mask(model, rule, 0.02, seed=1)
    if quant:
        quantize_model(model, mask, quant=quant)
    return model, mask, TrainableParams(model, mask)


@pytest.mark.parametrize("dtype,quant,tol,kernel_rows", [
    (torch.float32, None, 1e-5, 0), (torch.bfloat16, None, 2e-3, 0),
    (torch.bfloat16, "int4", 2e-3, 256),  # int4 matmul + correction, the ±ε deltas folded into the layer's own
    (torch.float32, "int4", 1e-5, 0),  # int4 rows above KERNEL_MAX_ROWS: dequantized weight, deltas added after
])
def test_fused_losses_equal_two_separate_forwards(monkeypatch, dtype, quant, tol, kernel_rows):
    monkeypatch.setattr(int4, "_compiled", lambda *key: None)  # eager int4 kernels: no compile in tests
    monkeypatch.setattr(int4, "_compiled_dequant", lambda *key: None)
    monkeypatch.setattr(int4, "KERNEL_MIN_WEIGHTS", 0)  # the 4-bit matmul + correction path on tiny layers too
    monkeypatch.setattr(int4, "KERNEL_MAX_ROWS", kernel_rows)
    model, mask, params = _setup(dtype, quant)
    loss = PMLoss(model, synthetic_batch(model, 3, 10, seed=4))
    before = loss()
    weights = [p.clone() for p in params.storage]
    fused = FusedPM(model, params)
    cfg = ZOConfig(eps=1e-2)
    for step in range(3):
        seed = step_seed(0, step)
        lp, lm = ZOEngine(params, cfg, 1, fused=fused).perturbed_losses(seed, loss)
        assert all(torch.equal(a, b) for a, b in zip(params.storage, weights))  # the weights were never written
        assert (lp, lm) == ZOEngine(params, cfg, 1, fused=fused).perturbed_losses(seed, loss)  # deterministic
        sp, sm = ZOEngine(params, cfg, 1).perturbed_losses(seed, loss)
        params.restore()
        assert abs(lp - sp) < tol and abs(lm - sm) < tol
        assert lp != lm
    fused.remove()
    assert loss() == before  # without its hooks the model computes as before
    assert all(getattr(m, "pm_delta", None) is None for m in model.modules())


def test_fused_training_follows_the_unfused_one_and_replays_exactly():
    from sparsezo.training.replay import replay_params
    from sparsezo.tasks import Example
    from sparsezo.training.config import TrainConfig
    from sparsezo.training.loop import fine_tune
    from sparsezo.training.rundir import trajectory_meta

    tok = tiny_tokenizer()
    ex = lambda n, s: [Example(f"{t} It was", [" terrible", " great"], y) for y, t in sentences(n, s)]  # noqa: E731
    results = {}
    for fused in (False, True):
        model, mask, params = _setup(torch.float32)
        cfg = TrainConfig(steps=8, eval_every=8, batch_size=4, keep_best=False, fused_pm="on" if fused else "off",
                          zo=ZOConfig(lr=0.05, eps=1e-2))
        res = fine_tune(model, tok, params, ex(32, 1), ex(8, 2), cfg, progress=False)
        res.trajectory.meta = trajectory_meta(params, cfg.zo, 8, {})
        results[fused] = (res.trajectory, params.theta.clone())
        assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone after training
    (plain, theta_plain), (joint, theta_joint) = results[False], results[True]
    assert torch.allclose(torch.tensor(joint.grads), torch.tensor(plain.grads), rtol=1e-3, atol=1e-4)
    assert not torch.equal(torch.tensor(joint.grads), torch.tensor(plain.grads))  # really another code path
    assert torch.allclose(theta_joint, theta_plain, atol=1e-5)
    base, mask, _ = _setup(torch.float32)
    assert torch.equal(replay_params(base, mask, joint, progress=False).theta, theta_joint)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_fused_pm_auto_fuses_small_batches_on_a_4bit_base_only(monkeypatch, quant):
    """auto = on for a 4-bit base and batches within FUSED_AUTO_TOKENS, else off (bit-identical
    trajectories to the matching explicit setting, and fused ones differ from unfused by rounding)."""
    from sparsezo.training import loop as train_mod
    from sparsezo.tasks import Example
    from sparsezo.training.config import TrainConfig
    from sparsezo.training.loop import fine_tune

    monkeypatch.setattr(int4, "_compiled", lambda *key: None)
    monkeypatch.setattr(int4, "_compiled_dequant", lambda *key: None)
    monkeypatch.setattr(int4, "KERNEL_MIN_WEIGHTS", 0)
    tok = tiny_tokenizer()
    ex = lambda n, s: [Example(f"{t} It was", [" terrible", " great"], y) for y, t in sentences(n, s)]  # noqa: E731
    grads = {}
    for setting, limit in (("auto", 64), ("on", 64), ("off", 64), ("auto", 1)):
        monkeypatch.setattr(train_mod, "FUSED_AUTO_TOKENS", limit)
        model, mask, params = _setup(torch.float32, quant)
        cfg = TrainConfig(steps=4, eval_every=4, batch_size=2, fused_pm=setting, zo=ZOConfig(lr=0.05, eps=1e-2))
        res = fine_tune(model, tok, params, ex(16, 1), ex(4, 2), cfg, progress=False)
        grads[setting, limit] = res.trajectory.grads
    assert grads["on", 64] != grads["off", 64]  # another code path (float rounding)
    assert grads["auto", 64] == (grads["on", 64] if quant else grads["off", 64])
    assert grads["auto", 1] == grads["off", 64]  # batches above the limit are never fused


def test_fused_refuses_sets_it_cannot_correct():
    model, mask, params = _setup(torch.float32, rule="full")
    with pytest.raises(SparseZOError, match="full ZO"):
        FusedPM(model, params)


def test_an_int4_layer_refuses_rows_that_do_not_split_into_the_fused_halves(monkeypatch):
    monkeypatch.setattr(int4, "_compiled", lambda *key: None)
    model, mask, params = _setup(torch.float32, "int4")
    layer = next(m for m in model.modules() if isinstance(m, int4.Int4Linear) and m.idx.numel())
    layer.pm_delta = torch.zeros(2, layer.idx.numel())
    with pytest.raises(SparseZOError, match="2 equal row groups, got 3 rows"):
        layer(torch.randn(3, layer.in_features))
