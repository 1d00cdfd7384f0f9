"""Issue 19: the fzoo estimator (one-sided slopes sharing L(θ), spread-normalised step): its slopes,
descent and loss-scale invariance on a quadratic, forwards per step, replay and resume identity."""

import json

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from sparsezo.training.checkpoint import load_checkpoint
from sparsezo.cli import main
from sparsezo.errors import SparseZOError
from sparsezo.masks import compute_mask
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.zo import TrainableParams, Trajectory, ZOConfig, ZOEngine, sample
from sparsezo.zo.fzoo import FZOO
from sparsezo.zo.registry import forwards_per_step
from test_convergence import Quadratic, _examples, _fine_tune, env, first_step_alignment  # noqa: F401 (env: fixture)


def _engine(model, lr=0.05, steps=400, q=4, **kw):
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = ZOConfig(lr=lr, eps=1e-3, optimizer="fzoo", q=q, direction="sampled", **kw)
    return params, ZOEngine(params, cfg, steps)


def test_fzoo_pays_one_forward_per_query_plus_the_centre_and_needs_two_queries():
    assert forwards_per_step("fzoo", 8) == 9 and forwards_per_step("sgd", 8) == 16
    with pytest.raises(SparseZOError, match=r"--q >= 2"):
        ZOConfig(optimizer="fzoo", q=1).validate()
    assert FZOO.normalise([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]  # no spread: no preferred direction
    g = FZOO.normalise([1.0, 3.0])
    assert g == pytest.approx([1 / 2**0.5, 3 / 2**0.5])  # sample std of (1, 3) is √2


def test_fzoo_slopes_are_one_sided_differences_from_the_shared_centre():
    model = Quadratic()
    w0 = model.layers[0].mlp.weight.reshape(-1).clone()
    calls = []

    def loss():
        calls.append(1)
        return model.loss()

    params, engine = _engine(model, lr=1e-12, q=3)
    rec = engine.step(0, loss)
    assert len(calls) == 4  # L(θ) once, then one forward per query
    l0 = model.of(w0).item()
    for seed, g in zip(rec.seeds, rec.grads):
        z = sample(seed, 0, params.numel, "gaussian")
        moved = (w0.float() + 1e-3 * z).double()  # θ is an fp32 master copy: θ + εz is rounded to fp32
        assert g == pytest.approx((model.of(moved).item() - l0) / 1e-3, rel=1e-9)
    assert rec.loss == pytest.approx(l0) and rec.curvs is None


def test_fzoo_descends_a_quadratic_and_its_step_ignores_the_loss_scale():
    runs = {}
    for scale in (1.0, 1000.0):
        model = Quadratic(scale)
        start, best = model.loss(), model.optimum()
        _, engine = _engine(model)
        for t in range(400):
            engine.step(t, model.loss)
        runs[scale] = model.layers[0].mlp.weight.clone()
        assert model.loss() - best < 0.1 * (start - best), scale
    # slopes and their spread scale together: the same lr takes the same steps on a 1000x loss
    assert torch.allclose(runs[1.0], runs[1000.0], rtol=1e-4, atol=1e-6)


def test_the_fzoo_update_is_a_descent_direction_in_expectation():
    # the spread-normalised slopes are a random rescaling per step: the mean still points downhill
    assert first_step_alignment(lambda model, t: _engine(model, lr=1e-3, seed=t), 1000) > 0.8


def test_fzoo_run_replays_byte_for_byte_with_a_format_1_trajectory(env, capsys):
    run = env["root"] / "fzoo"
    argv = ["train", "--model", env["model"], "--data-dir", env["data"], "--dtype", "bfloat16", "--mask", "random",
            "--density", "0.05", "--steps", "20", "--eval-every", "10", "--num-train", "64", "--num-dev", "16",
            "--num-test", "16", "--lr", "1e-3", "--optimizer", "fzoo", "--q", "4", "--out", str(run), "--json",
            "--keep-last"]  # the delta of the last step: every step is replayed
    assert main(argv) == 0  # bf16: the applied one-sided direction depends on rounding
    res = json.loads(capsys.readouterr().out)
    assert isinstance(res["improved"], bool)
    raw = (run / "trajectory.safetensors").read_bytes()
    assert b"sparsezo.trajectory/1" in raw and b"curvs" not in raw  # σ is rebuilt from the recorded slopes
    traj = Trajectory.load(run / "trajectory.safetensors")
    assert len(traj) == 20 and len(traj.grads[0]) == 4
    assert any(g != traj.grads[0][0] for g in traj.grads[0])
    out = env["root"] / "fzoo-replayed.safetensors"
    assert main(["replay", str(run), "--out", str(out)]) == 0
    assert "replayed all 20 recorded steps" in capsys.readouterr().out
    assert out.read_bytes() == (run / "delta.safetensors").read_bytes()


def test_fzoo_resume_from_a_checkpoint_gives_the_same_bytes(tmp_path):
    kw = {"optimizer": "fzoo", "lr": 1e-3}
    full, ref = _fine_tune(steps=12, **kw)
    _fine_tune(tmp_path, steps=6, **kw)  # stops after step 6 as if killed there
    state = load_checkpoint(tmp_path)
    assert state.step == 6
    resumed, res = _fine_tune(tmp_path, resume=state, steps=12, **kw)
    assert resumed.theta.numpy().tobytes() == full.theta.numpy().tobytes()
    a, b = ref.trajectory.tensors(), res.trajectory.tensors()
    assert set(a) == set(b) == {"seeds", "grads", "lrs"}
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_fzoo_learns_the_tiny_task():
    model, tok = tiny_model(dtype=torch.float32), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
    cfg = TrainConfig(steps=60, batch_size=16, eval_every=20,
                      zo=ZOConfig(lr=3e-3, eps=1e-2, optimizer="fzoo", q=4))
    res = fine_tune(model, tok, params, _examples(64, 1), _examples(32, 2), cfg, progress=False)
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # the training loss falls
