"""Run directories: crash-safe checkpoints and resume, trajectory replay, merge/export, info."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import save_tiny_model, sentences, tiny_model, tiny_tokenizer, write_sst2
from sparsezo.training.checkpoint import load_checkpoint, load_delta
from sparsezo.cli import main
from sparsezo.masks import compute_mask
from sparsezo.tasks import Example
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.zo import StepRecord, TrainableParams, Trajectory, ZOConfig


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"model": str(save_tiny_model(root / "model")), "other": str(save_tiny_model(root / "other", seed=1)),
            "data": str(write_sst2(root / "sst2")), "root": root}


def _train(env, out, *extra, steps=40, dtype="float32"):
    """A CLI training run exercising optimiser state (Adam), q=2 and best-dev selection."""
    return ["train", "--model", env["model"], "--data-dir", env["data"], "--dtype", dtype, "--mask", "random",
            "--density", "0.05", "--steps", str(steps), "--eval-every", "10", "--num-train", "64", "--num-dev", "16",
            "--num-test", "16", "--lr", "3e-3", "--eps", "1e-3", "--optimizer", "adam", "--q", "2",
            "--checkpoint-every", "2", "--out", str(out), *extra]


def _examples(n, seed):
    return [Example(f"{s} It was", [" terrible", " great"], y) for y, s in sentences(n, seed)]


def _fine_tune(run_dir=None, resume=None, steps=12, keep=1):
    model, tok = tiny_model(), tiny_tokenizer()
    params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
    cfg = TrainConfig(steps=steps, batch_size=8, eval_every=4, zo=ZOConfig(lr=1e-2, eps=1e-3, optimizer="momentum"))
    res = fine_tune(model, tok, params, _examples(64, 1), _examples(16, 2), cfg, progress=False, run_dir=run_dir,
                    checkpoint_every=2 if run_dir else 0, keep_checkpoints=keep, resume=resume)
    return params, res


def test_resume_after_sigkill_gives_the_same_bytes(env, capsys):
    ref = env["root"] / "ref"
    assert main(_train(env, ref, steps=120)) == 0
    capsys.readouterr()
    killed = env["root"] / "killed"
    kill_at = random.Random().randint(4, 60)  # a random step: may land in the middle of a checkpoint write
    proc = subprocess.Popen([sys.executable, "-m", "sparsezo.cli", *_train(env, killed, steps=120)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*")] if killed.exists() else []
        if done and max(done) >= kill_at:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "delta.safetensors").exists()
    assert main(["train", "--resume", str(killed)]) == 0
    for name in ("delta.safetensors", "trajectory.safetensors"):
        assert (killed / name).read_bytes() == (ref / name).read_bytes(), (name, kill_at)
    assert not list(killed.glob("checkpoint-*")) and not list(killed.glob(".checkpoint-*"))
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 121))  # no step logged twice
    assert json.loads((killed / "config.json").read_text())["resumed"] == 1


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    full, _ = _fine_tune(steps=12)
    _fine_tune(tmp_path, steps=8, keep=2)  # stops after step 8 as if killed: checkpoints 6 and 8 remain
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000006", "checkpoint-00000008"]
    state_file = tmp_path / "checkpoint-00000008" / "state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:-100])  # cut off mid-write
    state = load_checkpoint(tmp_path)
    assert state is not None and state.step == 6 and len(state.trajectory) == 6
    resumed, res = _fine_tune(tmp_path, resume=state, steps=12, keep=2)
    assert torch.equal(resumed.theta, full.theta)
    (tmp_path / "checkpoint-00000012" / "state.json").unlink()
    assert load_checkpoint(tmp_path).step == 10


def test_resume_refuses_other_flags_and_finished_runs(env, capsys):
    out = env["root"] / "short"
    assert main(_train(env, out, steps=4)) == 0
    assert main(["train", "--resume", str(out), "--lr", "1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(_train(env, out, steps=4)) == 2  # a finished run's --out: use it, not --resume it
    err = capsys.readouterr().err
    assert f"sparsezo eval --delta {out}" in err and "--resume" not in err


def test_resume_reads_a_config_written_when_fused_pm_was_a_switch(env, capsys):
    out = env["root"] / "legacy"
    assert main(_train(env, out, steps=4)) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["fused_pm"] == "auto"
    cfg["args"]["fused_pm"] = False  # how earlier versions recorded it
    (out / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file

    delta = load_file(out / "delta.safetensors")
    (out / "delta.safetensors").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0, capsys.readouterr().err
    resumed = load_file(out / "delta.safetensors")  # the same values (its metadata now says "off")
    assert resumed.keys() == delta.keys() and all(torch.equal(resumed[k], delta[k]) for k in delta)


def test_replay_rebuilds_the_delta_byte_for_byte(env, capsys):
    run = env["root"] / "bf16"
    assert main(_train(env, run, steps=30, dtype="bfloat16")) == 0  # bf16: the applied direction depends on rounding
    capsys.readouterr()
    out = env["root"] / "replayed.safetensors"
    assert main(["replay", str(run), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert out.read_bytes() == (run / "delta.safetensors").read_bytes()
    config = json.loads((run / "config.json").read_text())
    assert info["steps"] == config["results"]["best_step"] and info["recorded_steps"] == 30
    traj = Trajectory.load(run / "trajectory.safetensors")
    assert len(traj) == 30 and len(traj.seeds[0]) == 2
    assert (run / "trajectory.safetensors").stat().st_size < (run / "delta.safetensors").stat().st_size


def test_replay_with_the_wrong_model_or_mask_fails_clearly(env, capsys):
    run = env["root"] / "bf16"
    if not run.exists():
        assert main(_train(env, run, steps=30, dtype="bfloat16")) == 0
    assert main(["replay", str(run), "--model", env["other"], "--out", str(env["root"] / "x.safetensors")]) == 2
    assert "different model" in capsys.readouterr().err
    other_mask = env["root"] / "other-mask.safetensors"
    assert main(["mask", "compute", "--model", env["model"], "--mask", "random", "--density", "0.05", "--seed", "7",
                 "--out", str(other_mask)]) == 0
    assert main(["replay", str(run), "--mask", str(other_mask), "--out", str(env["root"] / "y.safetensors")]) == 2
    assert "not the one this trajectory was trained with" in capsys.readouterr().err
    assert not (env["root"] / "x.safetensors").exists() and not (env["root"] / "y.safetensors").exists()


def test_trajectory_round_trip_and_partial_replay(tmp_path):
    model = tiny_model()
    params = TrainableParams(model, compute_mask(model, "random", 0.1, seed=0))
    base = params.theta.clone()
    traj = Trajectory(meta={"note": "x"})
    for t in range(5):
        traj.append(StepRecord(t, [1000 + t], [0.5 - t], 1e-2, 0.0))
    with pytest.raises(Exception, match="cannot append step 9"):
        traj.append(StepRecord(9, [1], [1.0], 1e-2, 0.0))
    traj.save(tmp_path / "t.safetensors")
    loaded = Trajectory.load(tmp_path / "t.safetensors")
    assert (loaded.seeds, loaded.grads, loaded.lrs, loaded.meta) == (traj.seeds, traj.grads, traj.lrs, traj.meta)
    loaded.replay(params, ZOConfig(), steps=0)
    assert torch.equal(params.theta, base)
    loaded.replay(params, ZOConfig())
    assert not torch.equal(params.theta, base)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_merged_export_loads_in_transformers_with_the_same_logits(env, capsys, quant):
    from transformers import AutoModelForCausalLM

    if quant:
        pytest.importorskip("bitsandbytes", reason="the nf4 path needs bitsandbytes (pip install -e '.[nf4]')")
    run = env["root"] / f"merge-{quant}"
    assert main(_train(env, run, "--keep-last", *(["--quant", quant] if quant else []), steps=6)) == 0
    out = env["root"] / f"merged-{quant}"
    assert main(["merge", "--delta", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()[-1]  # the folder written first, and the base said to be untouched
    assert said.startswith(f"wrote {out}: ") and " trained weights" in said and "the base itself is unchanged" in said
    assert ("4-bit base dequantized" in said) == bool(quant) and " -> " not in said
    from sparsezo.model.load import load_model

    delta = load_delta(run)
    model, _ = load_model(env["model"], "float32", quant=quant, mask=delta.mask if quant else None)
    ids = torch.arange(1, 12)[None]
    base_logits = model(input_ids=ids).logits
    delta.apply(model)
    tuned = model(input_ids=ids).logits
    assert not torch.equal(base_logits, tuned)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(merged(input_ids=ids).logits, tuned)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]


def test_info_reports_file_sizes(env, capsys):
    run = env["root"] / "short"
    if not run.exists():
        assert main(_train(env, run, steps=4)) == 0
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is True and info["task"] == "sst2"
    for k in ("trajectory", "delta", "mask"):
        assert info[f"{k}_bytes"] == (Path(run) / f"{k}.safetensors").stat().st_size
    n_params = sum(p.numel() for p in tiny_model().parameters())
    assert info["full_model_bytes"] == 4 * n_params  # float32 run
    assert main(["info", str(run)]) == 0  # the step the delta was taken at, as replay reports it
    best = json.loads((run / "config.json").read_text())["results"]["best_step"]
    assert f"4 steps, the delta is θ at step {best} (best dev" in capsys.readouterr().out.splitlines()[0]
    assert main(["info", str(env["root"])]) == 2


def test_theta_layout_is_the_same_for_a_computed_and_a_loaded_mask(tmp_path):
    from sparsezo.masks import Mask

    model = tiny_model()
    mask = compute_mask(model, "random", 0.05, seed=3)
    mask.save(tmp_path / "m.safetensors")
    loaded = Mask.load(tmp_path / "m.safetensors")
    assert list(loaded.indices) != list(mask.indices)  # the file lists tensors in another (sorted) order
    a, b = TrainableParams(model, mask), TrainableParams(model, loaded)
    assert a.names == b.names and torch.equal(a.theta, b.theta) and mask.digest() == loaded.digest()


def test_replayed_delta_leaves_the_base_model_untouched(env, capsys):
    from sparsezo.masks import Mask
    from sparsezo.model.load import load_model
    from sparsezo.training.replay import replayed_delta

    run = env["root"] / "api-replay"
    assert main(_train(env, run, "--keep-last", steps=6)) == 0
    capsys.readouterr()
    model, _ = load_model(env["model"], "float32")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = replayed_delta(model, Mask.load(run / "mask.safetensors"), Trajectory.load(run / "trajectory.safetensors"))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(delta.values[n], v) for n, v in load_delta(run).values.items())
    delta.apply(model).remove()  # the base still passes the fingerprint check
