"""Perturbation noise: version 2 is an exact, device-independent construction; version 1 still replays."""

import json

import pytest

from legacy_fixture import CASES, DATA, build, theta_digest
from sparsezo.zo import Trajectory, ZOConfig


@pytest.mark.parametrize("name", sorted(CASES))
def test_legacy_v1_trajectories_replay_byte_identically(name):
    """Trajectories written before noise version 2 rebuild the same θ bytes (legacy noise and arithmetic)."""
    net, params = build(name)
    before = theta_digest(params)
    traj = Trajectory.load(DATA / f"{name}.safetensors")
    traj.replay(params, ZOConfig(**traj.meta["zo"]))
    expected = json.loads((DATA / "digests.json").read_text())[name]
    assert before != expected  # the run moved θ: the comparison below can fail
    assert theta_digest(params) == expected


# ---- version 2: the construction, against a Python-integer specification --------------------

import hashlib  # noqa: E402

import torch  # noqa: E402

from sparsezo.zo import noise  # noqa: E402
from sparsezo.zo.arith import LegacyOps, Ops, ops_for  # noqa: E402
from sparsezo.zo.noise import gaussian_table, hash_word_reference, sample  # noqa: E402

TABLE_SHA256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"
V1_SHA256 = {  # sample(42, 60000, 140000, dist, version=1), computed by the code before version 2
    "gaussian": "98b80d107f7014f1d0d07a24dd66f82e57683483f92fe9f52a03799814603bcc",
    "rademacher": "b158e14f139f87a21d6d402503c40373c1afbd4c8a112f719bdc54feba258d32",
}


def entry_reference(seed: int, i: int, dist: str) -> float:
    """Entry i of a version-2 perturbation, from the Python-integer hash (the specification)."""
    if dist == "gaussian":
        word = hash_word_reference(seed, i // 2)
        return gaussian_table()[(word >> (16 * (i % 2))) & 0xFFFF].item()
    return 1.0 - 2.0 * ((hash_word_reference(seed, i // 32) >> (i % 32)) & 1)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("start", [0, 12_345, (1 << 33) - 40, (1 << 37) - 70])  # incl. across a 2**32-word region
def test_tensor_noise_equals_the_integer_specification(dist, start):
    z = sample(77, start, start + 150, dist)
    assert z.tolist() == [entry_reference(77, i, dist) for i in range(start, start + 150)]


def test_hash_words_match_the_reference_bit_for_bit():
    h = noise.hash_words(3, 1000, 4096)
    got = (h.to(torch.int64) & 0xFFFFFFFF).tolist()
    assert got == [hash_word_reference(3, w) for w in range(1000, 1000 + 4096)]
    assert len(set(got)) == len(got)  # a bijection of the counter: no repeated words within a seed


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_an_entry_does_not_depend_on_the_chunking(dist, monkeypatch):
    whole = sample(9, 3, 300_001, dist)
    cuts = [3, 5, 64, 65, 1000, 65_537, 200_000, 300_001]
    parts = torch.cat([sample(9, a, b, dist) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, parts)
    monkeypatch.setitem(noise.PIECE, "cpu", 96)  # tiny pieces: many hash calls, same values
    assert torch.equal(sample(9, 3, 300_001, dist), whole)
    assert not torch.equal(whole, sample(10, 3, 300_001, dist))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_noise_has_zero_mean_unit_variance_and_independent_seeds(dist):
    n = 1 << 20
    a, b = sample(1, 0, n, dist), sample(2, 0, n, dist)
    se = n ** -0.5
    assert abs(a.mean().item()) < 5 * se
    assert abs(a.var().item() - 1) < 5 * (2 ** 0.5 if dist == "gaussian" else 0.1) * se + 1e-6
    assert abs((a * b).mean().item()) < 5 * se  # different seeds: uncorrelated
    assert abs((a[1:] * a[:-1]).mean().item()) < 5 * se  # neighbouring entries: uncorrelated
    if dist == "gaussian":
        assert abs((a ** 4).mean().item() - 3) < 0.05  # the Gaussian's kurtosis (the tails are cut at 4.3σ)
    else:
        assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_gaussian_table_is_pinned_exact_and_antisymmetric():
    t = gaussian_table()
    assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == TABLE_SHA256
    assert t.dtype == torch.float32 and t.numel() == 65536
    assert torch.equal(t, -t.flip(0)) and bool((t[1:] > t[:-1]).all())
    assert abs(t.double().pow(2).mean().item() - 1) < 1e-6


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_version_1_is_unchanged(dist):
    z = sample(42, 60000, 140000, dist, version=1)
    assert hashlib.sha256(z.numpy().tobytes()).hexdigest() == V1_SHA256[dist]
    assert not torch.equal(z, sample(42, 60000, 140000, dist))
    with pytest.raises(ValueError, match="noise version"):
        sample(42, 0, 10, dist, version=3)


def test_single_rounding_ops_round_each_operation():
    """Ops computes y + a·x as a rounded product then a sum, x / c as x · (1/c); LegacyOps as before."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    a = 0.1 + 1e-9
    assert torch.equal(Ops.axpy_(y.clone(), x, a), y + x * a)
    assert torch.equal(Ops.sq_axpy_(y.clone(), x, a), y + (x * x) * a)
    assert torch.equal(Ops.div(x, 3.0), x * (1 / 3.0))
    assert torch.equal(LegacyOps.axpy_(y.clone(), x, a), y.clone().add_(x, alpha=a))
    assert torch.equal(LegacyOps.div(x, 3.0), x / 3.0)
    assert not torch.equal(Ops.div(x, 3.0), LegacyOps.div(x, 3.0))  # the two really differ
    assert isinstance(ops_for(1), LegacyOps) and type(ops_for(2)) is Ops


def test_new_runs_record_version_2_and_old_files_load_as_version_1(tmp_path):
    from sparsezo.zo import ZOEngine

    net, params = build("sgd_rademacher")
    cfg = ZOConfig(dist="rademacher", q=1, lr=1e-2, seed=1)
    engine = ZOEngine(params, cfg, 2)
    traj = Trajectory(meta={"zo": engine.config_dict()})
    traj.append(engine.step(0, net.loss))
    traj.save(tmp_path / "t.safetensors")
    assert Trajectory.load(tmp_path / "t.safetensors").meta["zo"]["noise"] == 2
    old = Trajectory.load(DATA / "sgd_rademacher.safetensors")
    assert old.meta["zo"]["noise"] == 1


@pytest.mark.parametrize("at", [1 << 31, 1 << 32])  # the counter crosses int32's top, then wraps mod 2**32
def test_hash_counters_that_cross_int32_boundaries_match_the_reference(at):
    key_lo = noise.mix(4, 0) & 0xFFFFFFFF
    w0 = (at - key_lo - 5) % (1 << 32)  # counters (w + key_lo) mod 2**32 run across ``at``
    h = noise.hash_words(4, w0, 10)
    assert (h.to(torch.int64) & 0xFFFFFFFF).tolist() == [hash_word_reference(4, w) for w in range(w0, w0 + 10)]


# ---- version 2 across CPU kernels ------------------------------------------------------------

REPLAY_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file
sys.path.insert(0, sys.argv[1])
from legacy_fixture import CASES, Net, make_mask, theta_digest
from sparsezo.zo import TrainableParams, Trajectory, ZOConfig
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, (size, dtype, kind, _) in CASES.items():
    net = Net(size, dtype)
    net.load_state_dict(load_file(f"{sys.argv[2]}/{name}-init.safetensors"))  # randn differs across kernel sets
    params = TrainableParams(net, make_mask(net, kind))
    traj = Trajectory.load(f"{sys.argv[2]}/{name}.safetensors")
    traj.replay(params, ZOConfig(**traj.meta["zo"]))
    out[name] = theta_digest(params)
print(json.dumps(out))
"""


def test_version_2_replays_byte_identically_under_every_cpu_kernel_set(tmp_path):
    """A run trained here replays to the same θ bytes when ATen dispatches its scalar or AVX2 kernels.

    ATen picks vectorised kernels by CPU capability (``ATEN_CPU_CAPABILITY`` forces one); a kernel
    that contracted y + a·x into a fused multiply-add, or summed in another order, would change θ's
    last bits between machines. This is the CPU half of the cross-device claim, for every optimiser,
    both distributions, bf16 and a full θ across noise-block boundaries (the cases of legacy_fixture).
    The replays start from the trained run's initial weights, saved to a file: ``torch.randn`` itself
    gives other values under another kernel set (its vectorised Box-Muller), which is why a user's
    replay starts from the base model's file, not from a seed.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from legacy_fixture import STEPS
    from sparsezo.zo import ZOEngine

    trained = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name, (_, _, _, settings) in CASES.items():
        net, params = build(name)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / f"{name}-init.safetensors"))
        before = theta_digest(params)
        engine = ZOEngine(params, ZOConfig(**settings), STEPS)
        traj = Trajectory(meta={"zo": engine.config_dict()})
        for t in range(STEPS):
            traj.append(engine.step(t, net.loss))
        assert traj.meta["zo"]["noise"] == 2
        traj.save(tmp_path / f"{name}.safetensors")
        trained[name] = theta_digest(params)
        assert trained[name] != before  # θ moved: the comparison below can fail
    tests_dir = str(Path(__file__).parent)
    seen = {trained["capability"]}
    for cap in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        proc = subprocess.run([sys.executable, "-c", REPLAY_SCRIPT, tests_dir, str(tmp_path)], env=env,
                              capture_output=True, text=True, check=True)
        replayed = json.loads(proc.stdout.strip().splitlines()[-1])
        seen.add(replayed.pop("capability"))
        assert replayed == {k: v for k, v in trained.items() if k != "capability"}, cap
    if len(seen) < 2:
        pytest.skip(f"this CPU offers one ATen kernel set only ({seen}): nothing to compare across")
