"""Multi-process training on 2 CPU processes (gloo): rank agreement, equality with one process, failures.

Every process is started with OMP_NUM_THREADS=1 (one-process references too), so all forwards
run the same kernels and results can be compared bit for bit.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from helpers import save_tiny_model, sentences, tiny_model, tiny_tokenizer, write_sst2
from sparsezo.training.checkpoint import load_delta
from sparsezo.cli import build_parser
from sparsezo.cli.train import train_argv
from sparsezo.training.distributed import DistContext, init_from_env
from sparsezo.errors import SparseZOError
from sparsezo.masks import compute_mask
from sparsezo.tasks import Example
from sparsezo.training.config import TrainConfig
from sparsezo.training.loop import fine_tune
from sparsezo.zo import TrainableParams, ZOConfig

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMEOUT = 120  # seconds any subprocess may take before the test fails instead of hanging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {"model": str(save_tiny_model(root / "model")), "data": str(write_sst2(root / "sst2")), "root": root}


def _args(env, out, *extra, steps=200, q=4):
    return ["train", "--model", env["model"], "--data-dir", env["data"], "--dtype", "float32", "--mask", "random",
            "--density", "0.05", "--steps", str(steps), "--eval-every", "50", "--num-train", "64", "--num-dev", "16",
            "--num-test", "16", "--lr", "0.03", "--eps", "1e-3", "--q", str(q), "--out", str(out), "--json", *extra]


def _cli(*args, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object: only rank 0 reports


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return {f"{f}/{k}": v for f in ("delta", "trajectory") for k, v in load_file(run / f"{f}.safetensors").items()}


@pytest.fixture(scope="module")
def reference_q4(env):
    """One process, q=4: what query-parallel runs (any number of ranks, resumed or not) must reproduce."""
    out = env["root"] / "single-q4"
    _ok(_cli("-m", "sparsezo.cli", *_args(env, out)))
    return out


# ----------------------------------------------------------------------------- no processes needed
def test_data_shards_partition_the_batch_in_order():
    for n, world in [(16, 2), (7, 3), (3, 3)]:
        parts = [DistContext(r, world, "data", torch.device("cpu"), 1.0).shard(list(range(n))) for r in range(world)]
        assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert DistContext(1, 2, "query", torch.device("cpu"), 1.0).shard([5, 6, 7]) == [5, 6, 7]


def test_relaunch_command_line_parses_back_to_the_same_arguments(env):
    argv = _args(env, "out", "--nproc", "2", "--parallel", "query", "--keep-last", "--seq-len", "64")
    args = build_parser().parse_args(argv)
    assert vars(build_parser().parse_args(train_argv(args))) == vars(args)


def test_query_split_is_checked_before_any_process_starts(env, capsys):
    from sparsezo.cli import main

    assert main(_args(env, env["root"] / "never", "--nproc", "2", "--parallel", "query", q=3)) == 2
    assert "--q 3 is not a multiple of the 2 processes" in capsys.readouterr().err
    assert not (env["root"] / "never").exists()


# ----------------------------------------------------------------------------- API: 2 ranks via mp.spawn
def _examples(n, seed):
    return [Example(f"{s} It was", [" terrible", " great"], y) for y, s in sentences(n, seed)]


def _worker(rank: int, port: int, out: str, parallel: str, tamper: bool) -> None:
    """One rank: fine-tune the tiny model, then dump θ (or the error) for the parent to compare."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_from_env(parallel, 60, "cpu")
    try:
        model, tok = tiny_model(), tiny_tokenizer()
        params = TrainableParams(model, compute_mask(model, "random", 0.05, seed=1))
        base = params.theta.clone()
        if tamper and rank == 1:
            params.theta[0] += 1e-3  # as if this rank had loaded a slightly different checkpoint
        cfg = TrainConfig(steps=8, batch_size=8, eval_every=4, keep_best=False,
                          zo=ZOConfig(lr=1e-2, eps=1e-3, q=2, optimizer="momentum"))
        try:
            fine_tune(model, tok, params, _examples(64, 1), _examples(16, 2), cfg, progress=False, dist=ctx)
        except SparseZOError as e:
            Path(out, f"error{rank}.txt").write_text(str(e))
            return
        save_file({"theta": params.theta, "base": base}, str(Path(out, f"theta{rank}.safetensors")))
    finally:
        ctx.close()


def _spawn(tmp_path, parallel, tamper=False):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), parallel, tamper), nprocs=2, join=True)


@pytest.mark.parametrize("parallel", ["data", "query"])
def test_every_rank_ends_with_bit_identical_trainable_values(tmp_path, parallel):
    _spawn(tmp_path, parallel)
    t0, t1 = (load_file(tmp_path / f"theta{r}.safetensors") for r in range(2))
    assert torch.equal(t0["theta"], t1["theta"])
    assert not torch.equal(t0["theta"], t0["base"])  # it trained


def test_ranks_that_loaded_different_values_refuse_to_start(tmp_path):
    _spawn(tmp_path, "data", tamper=True)
    assert not list(tmp_path.glob("theta*"))
    for r in range(2):  # every rank stops with the same clear error, none trains
        msg = (tmp_path / f"error{r}.txt").read_text()
        assert msg.startswith("training processes disagree on the trainable values (rank 1 vs rank 0)"), msg


# ----------------------------------------------------------------------------- CLI: torchrun / --nproc
def test_query_parallel_on_2_ranks_equals_one_process_bit_for_bit(env, reference_q4):
    out = env["root"] / "torchrun-query"
    res = _ok(_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                   "-m", "sparsezo.cli", *_args(env, out, "--parallel", "query")))
    ref, got = _tensors(reference_q4), _tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (out / "metrics.jsonl").read_text() == (reference_q4 / "metrics.jsonl").read_text()
    ref_results = json.loads((reference_q4 / "config.json").read_text())["results"]
    assert res["best_dev_accuracy"] == ref_results["best_dev_accuracy"] and res["best_step"] == ref_results["best_step"]
    assert json.loads((out / "config.json").read_text())["processes"] == {"world_size": 2, "parallel": "query"}


def test_data_parallel_on_2_ranks_matches_one_process_with_the_whole_batch(env):
    """Equal up to float rounding, not bit for bit: each rank's forward sees half the batch (other
    shapes, other summation order in the kernels) and the mean is regrouped as (sum of 4) + (sum of 4)
    in float64 instead of one float32 mean of 8. Measured: step-1 losses differ by ~3e-8, projected
    gradients by ~1e-4 (of ~0.3), and after 30 steps θ agrees to ~1e-5 while training moved it by ~5e-2;
    the tolerances below leave a 7-20x margin."""
    one, two = env["root"] / "single-b8", env["root"] / "nproc-data"
    extra = ("--batch-size", "8", "--keep-last")
    _ok(_cli("-m", "sparsezo.cli", *_args(env, one, *extra, steps=30, q=2)))
    _ok(_cli("-m", "sparsezo", *_args(env, two, *extra, "--nproc", "2", steps=30, q=2)))  # the shortcut
    ref, got = _tensors(one), _tensors(two)
    assert all(torch.equal(ref[f"trajectory/{k}"], got[f"trajectory/{k}"]) for k in ("seeds", "lrs"))
    torch.testing.assert_close(got["trajectory/grads"], ref["trajectory/grads"], rtol=0, atol=2e-3)
    for k in (k for k in ref if k.endswith(".values")):
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-4)
    loss = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
            for r in (one, two)]
    assert loss[0] != loss[1]  # not the same computation ...
    torch.testing.assert_close(torch.tensor(loss[1]), torch.tensor(loss[0]), rtol=1e-5, atol=0)  # ... same result
    base, delta = load_file(Path(env["model"]) / "model.safetensors"), load_delta(one)
    moved = max((v - base[n].reshape(-1)[delta.mask.indices[n]]).abs().max().item() for n, v in delta.values.items())
    assert moved > 1e-2  # the tolerance is far below how far training moved θ


def test_a_dead_rank_stops_the_other_with_an_error_and_the_run_resumes_on_one_process(env, reference_q4):
    out = env["root"] / "killed"
    port, procs = _free_port(), []
    for rank in range(2):  # what torchrun starts, without its agent (which would kill the survivor itself)
        rank_env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                        LOCAL_RANK=str(rank))
        cmd = _args(env, out, "--parallel", "query", "--checkpoint-every", "5", "--dist-timeout", "30")
        procs.append(subprocess.Popen([sys.executable, "-m", "sparsezo.cli", *cmd], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + TIMEOUT
        while not list(out.glob("checkpoint-*")) and time.time() < deadline and procs[0].poll() is None:
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=TIMEOUT)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 2 and time.time() - t0 < 30, err[-2000:]  # no hang: gloo sees the closed socket
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparsezo: error: rank 0: lost contact with the other training processes during "), last
    assert f"continue it with: sparsezo train --resume {out}" in err
    assert not (out / "delta.safetensors").exists()

    _ok(_cli("-m", "sparsezo.cli", "train", "--resume", str(out), "--json"))  # 1 process continues a 2-process run
    ref, got = _tensors(reference_q4), _tensors(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
