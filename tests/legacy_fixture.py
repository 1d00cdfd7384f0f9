"""The runs behind tests/data/legacy_v1: trajectories written by sparsezo before noise version 2.

Each case trains a few ZO steps on a small self-contained model (no transformers: its init could
change between versions) and records the trajectory and the sha256 of the trained θ. The files
were produced by ``python tests/legacy_fixture.py`` on the commit before noise version 2; the test
(tests/test_noise.py) replays them with today's code and must get the same θ bytes, which proves
old trajectories keep replaying through the legacy noise and arithmetic.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sparsezo.masks import Mask
from sparsezo.zo import TrainableParams, Trajectory, ZOConfig, ZOEngine

DATA = Path(__file__).parent / "data" / "legacy_v1"
STEPS = 4

# name: (model size, dtype, mask kind, ZOConfig settings)
CASES: dict[str, tuple[str, torch.dtype, str, dict]] = {
    **{f"{opt}_{dist}": ("small", torch.float32, "sparse",
                         dict(optimizer=opt, dist=dist, q=2, lr=lr, eps=1e-2, weight_decay=wd, seed=11))
       for opt, lr, wd in (("sgd", 1e-2, 0.01), ("momentum", 1e-3, 0.0), ("adam", 1e-3, 0.01), ("sign", 1e-3, 0.0),
                           ("hizoo", 0.1, 0.0), ("fzoo", 1e-2, 0.0))
       for dist in ("gaussian", "rademacher")},
    "sgd_gaussian_bf16": ("small", torch.bfloat16, "sparse", dict(dist="gaussian", q=2, lr=1e-2, seed=3)),
    **{f"full_{dist}": ("large", torch.float32, "full", dict(dist=dist, q=1, lr=1e-3, seed=5))
       for dist in ("gaussian", "rademacher")},
}


class Net(nn.Module):
    """Two bias-free linears; "large" puts θ across noise block boundaries (70,000 entries)."""

    def __init__(self, size: str, dtype: torch.dtype):
        super().__init__()
        dims = (48, 64, 40) if size == "small" else (280, 250, 8)
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(dims[0], dims[1], bias=False)
        self.b = nn.Linear(dims[1], dims[2], bias=False)
        with torch.no_grad():
            for lin in (self.a, self.b):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
        self.x = torch.randn(16, dims[0], generator=g)
        self.y = torch.randn(16, dims[2], generator=g)
        self.to(dtype).requires_grad_(False)

    def loss(self) -> float:
        out = self.b(torch.relu(self.a(self.x.to(self.a.weight.dtype)))).float()
        return ((out - self.y) ** 2).mean().item()


def make_mask(net: Net, kind: str) -> Mask:
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    if kind == "full":
        return Mask({n: None for n in shapes}, shapes)
    return Mask({n: torch.arange(k % 5, p.numel(), 37) for k, (n, p) in enumerate(net.named_parameters())}, shapes)


def theta_digest(params: TrainableParams) -> str:
    return hashlib.sha256(params.theta.detach().cpu().numpy().tobytes()).hexdigest()


def build(name: str) -> tuple[Net, TrainableParams]:
    size, dtype, kind, _ = CASES[name]
    net = Net(size, dtype)
    return net, TrainableParams(net, make_mask(net, kind))


def generate() -> None:
    """Train every case and write its trajectory and θ digest (run on the pre-version-2 code only)."""
    digests = {}
    for name, (_, _, _, settings) in CASES.items():
        net, params = build(name)
        engine = ZOEngine(params, ZOConfig(**settings), STEPS)
        traj = Trajectory(meta={"zo": engine.config_dict()})
        for t in range(STEPS):
            traj.append(engine.step(t, net.loss))
        traj.save(DATA / f"{name}.safetensors")
        digests[name] = theta_digest(params)
    (DATA / "digests.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    generate()
