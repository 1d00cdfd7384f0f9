"""CUDA: the same noise, updates and masks as on the CPU. Marked ``cuda``; skipped without a GPU.

The device-agnostic logic (noise, top-k, the memory plan) is exercised on the CPU by the other
tests; these check what only a GPU can: bit equality across devices and the plan on the device.
The first test here checks the CUDA branch of the memory reading on any machine.
"""

import hashlib

import pytest
import torch

from legacy_fixture import Net, make_mask
from sparsezo import resources
from sparsezo.masks.topk import TopK
from sparsezo.zo import OPTIMIZERS, TrainableParams, Trajectory, ZOConfig, ZOEngine
from sparsezo.zo.noise import sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; run on a GPU machine")


def test_available_memory_of_a_cuda_device_is_free_plus_cached(monkeypatch):
    """free (driver) + reserved − allocated (torch's cache is reusable); never the host's RAM."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (5 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1 << 30)
    assert resources.available_memory_bytes("cuda:0") == 7 << 30
    assert resources.available_memory_bytes("cpu") == resources.available_memory_bytes()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_noise_is_bit_identical_on_cpu_and_cuda(dist):
    for start, end in ((0, 1 << 20), (12_345, 12_345 + 3_000_001), ((1 << 33) - 77, (1 << 33) + 500)):
        assert torch.equal(sample(5, start, end, dist, "cuda").cpu(), sample(5, start, end, dist, "cpu"))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cuda_run_replays_on_the_cpu_byte_for_byte_and_back(optimizer, dist, dtype):
    """Train on one device, replay the trajectory on the other: the same θ bytes, both ways."""
    q = 4 if optimizer in ("fzoo",) else 2
    cfg = dict(optimizer=optimizer, dist=dist, q=q, lr=1e-3 if optimizer != "hizoo" else 0.1, eps=1e-2, seed=7,
               weight_decay=0.01)
    for train_dev, replay_dev in (("cuda", "cpu"), ("cpu", "cuda")):
        net = Net("small", dtype).to(train_dev)
        net.x, net.y = net.x.to(train_dev), net.y.to(train_dev)
        params = TrainableParams(net, make_mask(net, "sparse"))
        engine = ZOEngine(params, ZOConfig(**cfg), 5)
        traj = Trajectory(meta={"zo": engine.config_dict()})
        for t in range(5):
            traj.append(engine.step(t, net.loss))
        other = Net("small", dtype).to(replay_dev)
        replayed = TrainableParams(other, make_mask(other, "sparse"))
        traj.replay(replayed, ZOConfig(**cfg))
        assert _digest(replayed.theta) == _digest(params.theta), (train_dev, replay_dev)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_4bit_layers_on_cuda_match_their_dense_reference(quant):
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    from sparsezo.testing import tiny_llama
    from sparsezo.quant import QUANT_LAYERS
    from sparsezo.quant.convert import quantize_model

    model = quantize_model(tiny_llama(seed=0, hidden=64).to("cuda", torch.bfloat16), quant=quant)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            ref = x.float() @ m.dequantized().float().T
            torch.testing.assert_close(m(x).float(), ref, rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.cuda
def test_topk_on_cuda_selects_what_the_cpu_selects():
    g = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.randn(5000, generator=g).abs().round(decimals=2) for i in range(4)}  # many ties
    picks = []
    for dev in ("cpu", "cuda"):
        top = TopK({n: s.numel() for n, s in scores.items()}, 0.01)
        for n, s in scores.items():
            top.offer(n, s.to(dev))
        picks.append(top.indices())
    assert all(torch.equal(picks[0][n], picks[1][n]) for n in scores)
    assert all(v.device.type == "cpu" for v in picks[1].values())


@cuda
@pytest.mark.cuda
def test_the_fisher_plan_of_a_cuda_model_reads_the_device():
    from sparsezo.masks.sensitive import plan_passes
    from sparsezo.model.params import eligible_parameters
    from sparsezo.testing import tiny_llama

    model = tiny_llama(seed=0).to("cuda")
    params = eligible_parameters(model)
    plan = plan_passes(model, params, rows=8, seq_len=32, micro_batch=2, pool_bytes=0)
    assert plan["memory_limit"] == resources.available_memory_bytes("cuda")
    assert plan["memory_limit"] <= torch.cuda.mem_get_info()[1]
    tight = plan_passes(model, params, rows=8, seq_len=32, micro_batch=2, pool_bytes=0,
                        memory_limit=plan["estimate_bytes"] - 4 * sum(p.numel() for p in params.values()) // 2)
    assert len(tight["groups"]) > 1  # --max-memory bounds the device's memory: the scores go in passes


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_a_plain_4bit_base_never_holds_its_dense_linears_on_the_gpu(tmp_path, quant):
    """`mask compute --quant` on a GPU: the base loads on the host and each linear is quantized onto the
    device in turn, so the device's peak stays near the 4-bit size, not the dense one."""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    from helpers import tiny_tokenizer
    from sparsezo.model.load import build_model
    from sparsezo.model.params import eligible_parameters
    from sparsezo.testing import tiny_llama

    dense = tiny_llama(seed=0, vocab_size=64, hidden=1024, layers=4)
    linear_bytes = sum(p.numel() * p.element_size() for p in eligible_parameters(dense).values())
    dense.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _, _ = build_model(tmp_path / "m", "float32", "cuda", quant=quant)
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    assert torch.cuda.max_memory_allocated() - base < linear_bytes / 2  # the fp32 linears were never there whole
