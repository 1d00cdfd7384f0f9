"""Issue 19: the hizoo estimator (curvature, descent, scale invariance, replay, resume), `improved`
reporting, the no-op delta note of merge, and `--lr auto`."""

import json
import logging

import pytest
import torch
from torch import nn

from helpers import save_tiny_model, sentences, tiny_model, tiny_tokenizer, write_sst2
from sparsezo.training.checkpoint import load_checkpoint
from sparsezo.cli import main
from sparsezo.masks import compute_mask
from sparsezo.tasks import Example
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.training.outcome import improvement
from sparsezo.training.lr_probe import PROBE_BACKOFF, PROBE_SHARE, choose_lr
from sparsezo.zo import TrainableParams, Trajectory, ZOConfig, ZOEngine, sample
from sparsezo.zo.registry import forwards_per_step
from sparsezo.zo.sgd import SGD


class Quadratic(nn.Module):
    """loss(w) = scale · mean((W x − y)²), in float64 so finite differences are exact to ~1e-12."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = nn.Linear(6, 4, bias=False).double()
        g = torch.Generator().manual_seed(1)
        self.layers[0].mlp.weight.data.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        self.x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        self.y = torch.randn(32, 4, generator=g, dtype=torch.float64)
        self.scale = scale
        self.requires_grad_(False)

    def of(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale * ((self.x @ w.view(4, 6).T - self.y) ** 2).mean()

    def loss(self) -> float:
        return self.of(self.layers[0].mlp.weight.reshape(-1)).item()

    def optimum(self) -> float:
        """The least-squares minimum (the residual of y outside x's span is not reachable)."""
        return self.of(torch.linalg.lstsq(self.x, self.y).solution.T.reshape(-1)).item()


def _engine(model, lr=0.3, steps=300, **kw):
    params = TrainableParams(model, compute_mask(model, "full"))
    return params, ZOEngine(params, ZOConfig(lr=lr, eps=1e-2, optimizer="hizoo", direction="sampled", **kw), steps)


def test_hizoo_measures_the_exact_curvature_along_z_and_its_diagonal_expectation():
    model = Quadratic()
    w0 = model.layers[0].mlp.weight.reshape(-1).clone()
    hess = torch.autograd.functional.hessian(model.of, w0)
    params, engine = _engine(model, lr=1e-12)
    est, n = torch.zeros(params.numel, dtype=torch.float64), 2000
    for t in range(n):
        rec = engine.step(t, model.loss)
        z = sample(rec.seeds[0], 0, params.numel, "gaussian").double()
        # exact for a quadratic, up to θ ± εz rounding in fp32
        assert rec.curvs[0] == pytest.approx((z @ hess @ z).item(), rel=1e-3)
        est += abs(rec.curvs[0]) * z**2
    # E[|zᵀHz| z_k²] = tr(H) + 2 H_kk for PSD H: the diagonal signal rides on the trace
    expected = torch.trace(hess) + 2 * torch.diagonal(hess)
    assert torch.allclose(est / n, expected, rtol=0.15)


def test_hizoo_descends_a_quadratic_and_its_step_ignores_the_loss_scale():
    runs = {}
    for scale in (1.0, 1000.0):
        model = Quadratic(scale)
        start, best = model.loss(), model.optimum()
        _, engine = _engine(model, lr=0.3, q=2)
        for t in range(300):
            engine.step(t, model.loss)
        runs[scale] = model.layers[0].mlp.weight.clone()
        assert model.loss() - best < 0.1 * (start - best), scale
    # the same lr on a 1000x larger loss takes the same steps (ZO-SGD's would be 1000x larger)
    assert torch.allclose(runs[1.0], runs[1000.0], rtol=1e-4, atol=1e-6)


def first_step_alignment(make_engine, n: int) -> float:
    """Cosine between −(mean first-step update over ``n`` seeds) and ∇L on the quadratic.

    ``make_engine(model, seed)`` gives (params, engine) with fresh state; each seed steps once from θ₀.
    """
    model = Quadratic()
    w0 = model.layers[0].mlp.weight.reshape(-1).clone()
    with torch.enable_grad():
        w = w0.clone().requires_grad_(True)
        true_grad = torch.autograd.grad(model.of(w), w)[0].float()
    moves = []
    for t in range(n):
        params, engine = make_engine(model, t)
        engine.step(0, model.loss)
        moves.append(params.theta - w0.float())
        params.theta.copy_(w0.float()), params.restore()
    mean = torch.stack(moves).mean(0)
    return torch.nn.functional.cosine_similarity(-mean, true_grad, dim=0).item()


def test_the_hizoo_update_is_a_descent_direction_in_expectation():
    # the first-step update −lr·ĝ/h of a fresh state
    assert first_step_alignment(lambda model, t: _engine(model, lr=1e-3, seed=t), 2000) > 0.8


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return {"model": str(save_tiny_model(root / "model")), "data": str(write_sst2(root / "sst2")), "root": root}


def _train(env, out, *extra, steps=30, lr="0.3", opt="hizoo", dtype="bfloat16"):
    return ["train", "--model", env["model"], "--data-dir", env["data"], "--dtype", dtype, "--mask", "random",
            "--density", "0.05", "--steps", str(steps), "--eval-every", "10", "--num-train", "64", "--num-dev", "16",
            "--num-test", "16", "--lr", lr, "--eps", "1e-2", "--optimizer", opt, "--q", "2", "--out", str(out), *extra]


def test_hizoo_run_replays_byte_for_byte_and_writes_trajectory_format_2(env, capsys):
    run = env["root"] / "hizoo"
    assert main(_train(env, run, "--json")) == 0  # bf16: the applied direction depends on rounding
    res = json.loads(capsys.readouterr().out)
    assert isinstance(res["improved"], bool) and "start_dev_accuracy" in res and res["dev_noise"] > 0
    traj = Trajectory.load(run / "trajectory.safetensors")
    assert len(traj.curvs) == 30 and len(traj.curvs[0]) == 2
    assert b"sparsezo.trajectory/2" in (run / "trajectory.safetensors").read_bytes()
    out = env["root"] / "hizoo-replayed.safetensors"
    assert main(["replay", str(run), "--out", str(out)]) == 0
    assert out.read_bytes() == (run / "delta.safetensors").read_bytes()
    # the curvatures are what replay needs: without them it refuses instead of writing another delta
    traj.curvs = []
    with pytest.raises(Exception, match="curvatures"):
        model = tiny_model(dtype=torch.bfloat16)
        traj.replay(TrainableParams(model, compute_mask(model, "random", 0.05)), ZOConfig(**traj.meta["zo"]))


def test_other_optimizers_still_write_format_1(env, capsys):
    run = env["root"] / "sgd"
    assert main(_train(env, run, steps=4, opt="sgd", lr="1e-3")) == 0
    raw = (run / "trajectory.safetensors").read_bytes()
    assert b"sparsezo.trajectory/1" in raw and b"curvs" not in raw
    assert Trajectory.load(run / "trajectory.safetensors").curvs == []


def _examples(n, seed):
    return [Example(f"{s} It was", [" terrible", " great"], y) for y, s in sentences(n, seed)]


def _fine_tune(run_dir=None, resume=None, steps=12, optimizer="hizoo", lr=0.3, **cfg_kw):
    model, tok = tiny_model(dtype=torch.bfloat16), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
    cfg = TrainConfig(steps=steps, batch_size=8, eval_every=4,
                      zo=ZOConfig(lr=lr, eps=1e-2, optimizer=optimizer, q=2), **cfg_kw)
    res = fine_tune(model, tok, params, _examples(64, 1), _examples(32, 2), cfg, progress=False, run_dir=run_dir,
                    checkpoint_every=2 if run_dir else 0, resume=resume)
    return params, res


def test_hizoo_resume_from_a_checkpoint_gives_the_same_bytes(tmp_path):
    full, ref = _fine_tune(steps=12)
    _fine_tune(tmp_path, steps=6)  # stops after step 6 as if killed there
    state = load_checkpoint(tmp_path)
    assert state.step == 6 and set(state.opt_state) == {"curv"} and len(state.trajectory.curvs) == 6
    resumed, res = _fine_tune(tmp_path, resume=state, steps=12)
    assert resumed.theta.numpy().tobytes() == full.theta.numpy().tobytes()
    a, b = ref.trajectory.tensors(), res.trajectory.tensors()
    assert set(a) == set(b) == {"seeds", "grads", "lrs", "curvs"}
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_improved_rule():
    se, ok = improvement(0.5, 0.6, 100, 200)
    assert se == pytest.approx(0.0354, abs=1e-3) and ok  # +10 points over 200 examples: > 2 SE
    assert not improvement(0.5, 0.55, 100, 200)[1]  # +5 points: within noise
    assert not improvement(0.5, 0.9, 0, 200)[1]  # best at step 0: nothing learned, whatever the numbers
    assert improvement(1.0, 1.0, 10, 50)[0] > 0  # a perfect base still has noise


def test_improved_on_a_learnable_task_and_not_with_a_vanishing_lr(caplog):
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=300, batch_size=16, eval_every=50, zo=ZOConfig(lr=0.3, eps=1e-3, optimizer="hizoo"))
    res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False)
    assert res.improved and res.best_dev > res.start_dev + 2 * res.dev_noise
    model = tiny_model()  # ZOConfig refuses lr 0; 1e-12 moves θ by ~1e-13: nothing can be learned
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=20, batch_size=16, eval_every=10, zo=ZOConfig(lr=1e-12, eps=1e-3))
    with caplog.at_level(logging.WARNING, logger="sparsezo"):
        res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False)
    assert not res.improved and res.best_step == 0
    warned = [r.getMessage() for r in caplog.records if "nothing was learned" in r.getMessage()]
    assert len(warned) == 1 and "TrainConfig(lr_auto=True)" in warned[0] and "ZOConfig(lr=3e-12)" in warned[0]


def test_merge_says_when_the_delta_is_the_base(env, capsys, caplog):
    run = env["root"] / "noop"
    assert main(_train(env, run, "--json", steps=10, opt="sgd", lr="1e-12")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["improved"] is False and out["best_step"] == 0
    assert main(["merge", "--delta", str(run), "--out", str(env["root"] / "noop-merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["delta_is_base"] is True
    assert any("delta equals the base" in r.getMessage() for r in caplog.records)
    assert main(["merge", "--delta", str(run), "--out", str(env["root"] / "noop-merged-2")]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {env['root'] / 'noop-merged-2'}: a copy of ") and "nothing was learned" in said
    # replay of a run that kept step 0: both step counts, and why the delta is the base
    assert main(["replay", str(run), "--out", str(env["root"] / "noop-replayed.safetensors")]) == 0
    said = capsys.readouterr().out
    assert "replayed 0 of 10 recorded steps" in said and "delta equals the base" in said, said
    assert main(["replay", str(run), "--out", str(env["root"] / "noop-replayed-2.safetensors"), "--json"]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if "steps" in k} == {"steps": 0,
                                                                                             "recorded_steps": 10}
    if not (env["root"] / "hizoo").exists():
        assert main(_train(env, env["root"] / "hizoo")) == 0
    capsys.readouterr()
    assert main(["merge", "--delta", str(env["root"] / "hizoo"), "--out", str(env["root"] / "merged"), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["delta_is_base"] is (json.loads((env["root"] / "hizoo" / "config.json").read_text())
                                                     ["results"]["best_step"] == 0)


def test_lr_auto_picks_a_sane_lr_within_its_forward_cap():
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "full"))
    grid = (1e-5, 1e-3, 3e-2, 1.0, 30.0)  # 3e-2 is this toy's known good lr (test_train); 1e-5 does nothing
    cfg = TrainConfig(steps=400, batch_size=16, eval_every=100, lr_auto=True, lr_grid=grid,
                      zo=ZOConfig(lr=1e-4, eps=1e-3))
    res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False)
    probe = res.lr_probe
    assert probe["probe_best_lr"] in (1e-3, 3e-2, 1.0) and res.lr == probe["lr"]
    assert probe["lr"] == pytest.approx(probe["probe_best_lr"] / PROBE_BACKOFF)  # short probes overrate large lrs
    assert probe["dev_loss"][grid.index(probe["probe_best_lr"])] < probe["start_dev_loss"]
    assert probe["forwards"] <= PROBE_SHARE * 400 * forwards_per_step("sgd", 1) == probe["cap_forwards"]
    assert res.history[0] == {"step": 0, "lr_auto": probe}
    assert all(r["lr"] == probe["lr"] for r in res.history if "loss" in r)


def test_lr_auto_takes_the_lowest_dev_loss_backed_off_or_the_centre_when_none_lowered_it():
    grid = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert PROBE_BACKOFF == 10  # the expected lrs below are written out
    assert choose_lr(grid, [1.9, 1.8, 1.85, 2.5, None], 2.0) == (1e-5, 1, False)
    assert choose_lr(grid, [1.8, 1.8, 1.9, 2.0, 2.1], 2.0) == (1e-6, 0, False)  # ties: the smaller
    # none went below the start: the least-raised is merely the smallest step, so the probe says nothing
    assert choose_lr(grid, [2.01, 2.02, 2.05, 2.5, 3.0], 2.0) == (1e-3, 0, True)
    assert choose_lr(grid, [2.01, 2.02, None, None, None], 2.0) == (1e-4, 0, True)  # below a divergence
    assert choose_lr(grid, [2.01, 2.02, 2.05, 2.5, 3.0], None) == (1e-6, 0, False)  # no start: no test


def test_lr_auto_warns_and_trains_at_the_grid_centre_when_no_candidate_lowers_the_dev_loss(monkeypatch, caplog):
    calls = iter(range(10**6))  # every dev-loss measurement after the start one is higher: no candidate helps
    monkeypatch.setattr("sparsezo.training.lr_probe.micro_batch_loss", lambda *a, **k: 1.0 + next(calls))
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=400, batch_size=16, eval_every=100, lr_auto=True, lr_grid=(1e-4, 1e-3, 1e-2),
                      zo=ZOConfig(lr=1.0, eps=1e-3))
    with caplog.at_level(logging.WARNING, logger="sparsezo"):
        res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False)
    assert res.lr_probe["choice"] == "no-signal" and res.lr_probe["probe_best_lr"] == 1e-4
    assert res.lr_probe["lr"] == res.lr == 1e-3  # the centre, not the smallest ÷ backoff (1e-5)
    assert any("no candidate lr" in r.getMessage() and "grid's centre, lr 0.001" in r.getMessage()
               for r in caplog.records)


def test_lr_auto_on_a_run_too_short_to_probe_trains_at_the_centre_of_its_measured_grid(caplog):
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=60, batch_size=16, eval_every=30, lr_auto=True, zo=ZOConfig(lr=1.0, eps=1e-3))
    with caplog.at_level(logging.INFO, logger="sparsezo"):
        res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False)
    probe = res.lr_probe
    assert probe["choice"] == "short-run" and probe["steps_each"] == 0 and probe["g2"] > 0
    assert probe["candidates"] == list(SGD.lr_grid(params.numel, probe["g2"]))  # centred on the measured g²
    assert res.lr == probe["lr"] == probe["candidates"][2]  # the middle of the half-decade grid
    # E[g²] within the 10% cap: 6 of its 8 queries (12 forwards of the run's 120), not all 8 (16, 13%)
    assert probe["g2_queries"] == 6 and probe["forwards"] == 12 == probe["cap_forwards"]
    assert any("too few to try" in r.getMessage() for r in caplog.records)
    assert res.steps == 60 and all(r["lr"] == probe["lr"] for r in res.history if "loss" in r)


def test_lr_auto_on_the_command_line_is_recorded(env, capsys):
    run = env["root"] / "auto"
    argv = _train(env, run, "--json", "--checkpoint-every", "50", steps=200, opt="hizoo", lr="auto")
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    config = json.loads((run / "config.json").read_text())
    assert config["lr_auto"]["lr"] == config["zo"]["lr"] == res["lr"] and config["train"]["lr_auto"] is True
    assert res["lr"] in config["lr_auto"]["candidates"] and config["args"]["lr"] is None
    assert res["lr_auto_forwards"] <= 0.1 * 200 * forwards_per_step("hizoo", 2)
    assert main(["train", "--lr", "fast"]) == 2  # neither a number nor auto: a usage error
    assert "expected a number or 'auto'" in capsys.readouterr().err


class _Killed(Exception):
    pass


def test_lr_auto_resumes_with_the_probed_lr_without_probing_again(tmp_path, monkeypatch):
    def run(run_dir=None, resume=None, kill_at=None):
        model, tok = tiny_model(), tiny_tokenizer()
        params = TrainableParams(model, compute_mask(model, "full"))
        cfg = TrainConfig(steps=300, batch_size=16, eval_every=50, lr_auto=True, lr_grid=(1e-3, 3e-2, 1.0),
                          zo=ZOConfig(lr=1e-4, eps=1e-3, optimizer="hizoo"))

        def on_eval(step):
            if step == kill_at:
                raise _Killed
            return {}

        res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False,
                        run_dir=run_dir, checkpoint_every=20 if run_dir else 0, resume=resume, on_eval=on_eval)
        return params, res, cfg

    full, ref, _ = run()
    with pytest.raises(_Killed):
        run(tmp_path, kill_at=150)
    state = load_checkpoint(tmp_path)
    assert state.step == 140 and state.history[0]["lr_auto"] == ref.lr_probe
    monkeypatch.setattr("sparsezo.training.loop.probe_lr", lambda *a, **k: pytest.fail("probed again on resume"))
    resumed, res, cfg = run(tmp_path, resume=state)
    assert res.lr == ref.lr_probe["lr"] and res.lr_probe == ref.lr_probe
    assert resumed.theta.numpy().tobytes() == full.theta.numpy().tobytes()


def test_sgd_grid_is_centred_on_the_measured_g2_and_falls_back_to_the_size_rule():
    from sparsezo.zo.registry import OPTIMIZERS
    from sparsezo.zo.sgd import REF_G2, REF_NUMEL

    sgd, mom = OPTIMIZERS["sgd"], OPTIMIZERS["momentum"]
    assert sgd.lr_grid(10**8, REF_G2)[2] == pytest.approx(sgd.lr_ref)  # the size of θ no longer matters
    assert sgd.lr_grid(7, REF_G2 / 300)[2] == pytest.approx(300 * sgd.lr_ref)  # a 300× weaker gradient: 300× the lr
    assert mom.lr_grid(7, REF_G2 / 300)[2] == pytest.approx(300 * mom.lr_ref)
    for unmeasured in (None, 0.0, float("nan")):  # no signal: the |θ| rule
        assert sgd.lr_grid(10 * REF_NUMEL, unmeasured)[2] == pytest.approx(sgd.lr_ref / 10)
    for name in ("adam", "sign", "hizoo", "fzoo"):  # their steps are normalised: g² does not centre them
        assert not OPTIMIZERS[name].grid_from_g2 and OPTIMIZERS[name].lr_grid(7, 1e-9) == OPTIMIZERS[name].lr_grid(7)


def test_projected_g2_is_the_mean_squared_slope_at_theta0_and_changes_nothing():
    from sparsezo.eval.scoring import batch_loss, encode, make_batch
    from sparsezo.training.batches import batch_indices
    from sparsezo.training.lr_probe import PROBE_G2_QUERIES, projected_g2
    from sparsezo.zo import step_seed

    model, tok = tiny_model(dtype=torch.bfloat16), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
    encoded = encode(tok, _examples(64, 1))
    cfg = TrainConfig(steps=50, batch_size=8, zo=ZOConfig(eps=1e-2, seed=3))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    theta = params.theta.clone()
    g2 = projected_g2(model, tok, params, encoded, cfg)
    assert torch.equal(params.theta, theta) and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    by_hand = []  # the same slopes, perturbing with the noise generator directly
    for t in range(PROBE_G2_QUERIES):
        batch = make_batch([encoded[i] for i in batch_indices(3, t, 64, 8)], tok.pad_token_id)
        z = sample(step_seed(3, t), 0, params.numel, "gaussian")
        losses = []
        for sign in (1, -1):
            params.write(theta + sign * 1e-2 * z)
            losses.append(batch_loss(model, batch, cfg.loss))
        params.restore()
        by_hand.append(((losses[0] - losses[1]) / 2e-2) ** 2)
    assert g2 > 0 and g2 == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-9)


def test_lr_auto_without_a_grid_centres_it_on_g2_and_counts_its_forwards():
    from sparsezo.training.lr_probe import PROBE_G2_QUERIES
    from sparsezo.zo.registry import OPTIMIZERS

    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=400, batch_size=16, eval_every=100, lr_auto=True, zo=ZOConfig(lr=1e-4, eps=1e-3))
    res = fine_tune(model, tok, params, _examples(128, 1), _examples(64, 2), cfg, progress=False)
    probe = res.lr_probe
    assert probe["g2"] > 0 and tuple(probe["candidates"]) == OPTIMIZERS["sgd"].lr_grid(params.numel, probe["g2"])
    ran = len(probe["candidates"]) * probe["steps_each"] * 2 + (len(probe["candidates"]) + 1) * 2  # 32 dev / 16
    assert probe["forwards"] == 2 * PROBE_G2_QUERIES + ran <= probe["cap_forwards"]


@pytest.mark.parametrize("steps", [4, 20, 100])
def test_lr_auto_never_spends_more_than_its_share_of_a_run(steps):
    """Short runs included: E[g²] takes fewer queries, or none (|θ|-centred grid), to stay within 10%."""
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "full"))
    cfg = TrainConfig(steps=steps, batch_size=16, eval_every=steps, lr_auto=True, zo=ZOConfig(lr=1.0, eps=1e-3))
    probe = fine_tune(model, tok, params, _examples(64, 1), _examples(32, 2), cfg, progress=False).lr_probe
    assert probe["forwards"] <= PROBE_SHARE * probe["run_forwards"] == PROBE_SHARE * 2 * steps
    assert (probe["g2"] is None) == (probe["g2_queries"] == 0) and (steps > 4 or probe["g2"] is None)


def test_the_default_lr_is_auto_and_its_runs_learn_replay_and_resume_identically(env, capsys, monkeypatch):
    """`train` with no --lr probes (sparsezo.TRAIN.lr is None): on the tiny task it learns, its trajectory
    replays to the same delta bytes, and a run interrupted after a checkpoint resumes to the same bytes.

    The settings give the verdict room on any CPU: 134 dev examples (a gain must clear ~0.09 rather
    than ~0.12), the full mask, 600 steps of 32. With a 5% random mask, 300 steps of 16 and 67 dev
    examples the gain sat at the noise threshold: it passed on an AVX2 CPU and failed on an AVX-512
    one, whose rounding changed the probe's choice."""
    data = write_sst2(env["root"] / "sst2-400", n_train=400)

    def argv(out):
        return ["train", "--model", env["model"], "--data-dir", str(data), "--dtype", "float32", "--mask", "full",
                "--steps", "600", "--batch-size", "32", "--eval-every", "50", "--num-train", "266", "--num-dev", "134",
                "--num-test", "64", "--eps", "1e-3", "--checkpoint-every", "40", "--out", str(out), "--json"]

    ref = env["root"] / "default-lr"
    assert main(argv(ref)) == 0
    res = json.loads(capsys.readouterr().out)
    config = json.loads((ref / "config.json").read_text())
    assert config["args"]["lr"] is None and config["train"]["lr_auto"] is True
    assert res["lr"] == config["lr_auto"]["lr"] and res["lr_auto_forwards"] <= 0.1 * 600 * 2
    assert res["improved"] and res["best_dev_accuracy"] > res["start_dev_accuracy"]
    replayed = env["root"] / "default-lr-replayed.safetensors"
    assert main(["replay", str(ref), "--out", str(replayed)]) == 0
    assert replayed.read_bytes() == (ref / "delta.safetensors").read_bytes()

    import sparsezo.training.loop as loop
    save = loop.save_checkpoint

    def save_then_stop(run_dir, state, **kw):
        save(run_dir, state, **kw)
        if state.step == 280:
            raise KeyboardInterrupt  # as a Ctrl-C right after the checkpoint

    stopped = env["root"] / "default-lr-stopped"
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    assert main(argv(stopped)) == 130 and not (stopped / "delta.safetensors").exists()
    monkeypatch.setattr(loop, "save_checkpoint", save)
    monkeypatch.setattr(loop, "probe_lr", lambda *a, **k: pytest.fail("probed again on resume"))
    assert main(["train", "--resume", str(stopped), "--json"]) == 0
    for name in ("delta.safetensors", "trajectory.safetensors"):
        assert (stopped / name).read_bytes() == (ref / name).read_bytes(), name
