"""Multi-process ZO on torch.distributed: data- or query-parallel steps that exchange scalars only.

A ZO step is a function of (seed, loss) pairs: every process holds the whole θ and regenerates z
from seeds, so processes only need to share the losses they measured — a few bytes per forward,
whatever the model size.

* ``data``: every rank uses the step's seeds on a contiguous shard of the global batch. After
  each forward the ranks all-gather (mean loss × examples, examples) as float64 and sum them in
  rank order, so every rank gets the same example-weighted mean (``batch_loss`` averages over
  examples) and applies the identical update. It equals one process with the whole batch only
  to float rounding: a half-batch forward and the regrouped sum differ in the last bits.
* ``query``: rank r measures queries r, r+W, r+2W, … of the step (``q`` a multiple of the W
  ranks), the (seed, L+, L−) triples are all-gathered and every rank applies all q updates in
  query order with :meth:`ZOEngine.apply` — bit-identical to one process with the same ``q``.

Launch with ``torchrun ... -m sparsezo train`` or ``sparsezo train --nproc N`` (:func:`launch`).
Rank 0 alone writes files; a dead or stalled rank makes the others fail with a
:class:`SparseZOError` (gloo notices a closed connection at once, anything else after the
process group's timeout).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import SparseZOError
from ..model.params import model_fingerprint
from ..zo import StepRecord, TrainableParams, ZOConfig, ZOEngine
from ..zo.noise import step_seed
from ..zo.registry import OPTIMIZERS

PARALLEL = ("data", "query")


@dataclass
class DistContext:
    """This process's place in the group, plus traffic counters (for benchmarks)."""

    rank: int
    world: int
    parallel: str
    device: torch.device  # where collective buffers live: the GPU for NCCL, else the CPU
    timeout: float
    comm_seconds: float = 0.0
    comm_bytes: int = 0  # payload bytes this rank sent plus received
    _held: list[tuple[torch.Tensor, int]] = field(default_factory=list, repr=False)  # see _settle

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's examples of a global batch: a contiguous slice (data) or all of them (query)."""
        if self.parallel == "query":
            return indices
        base, extra = divmod(len(indices), self.world)
        lo = self.rank * base + min(self.rank, extra)
        return indices[lo : lo + base + (self.rank < extra)]

    def _failed(self, what: str, e: Exception) -> SparseZOError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return SparseZOError(f"rank {self.rank}: lost contact with the other training processes during {what} "
                             f"(one of them exited, or stalled longer than --dist-timeout {self.timeout:g}s): {first}")

    def all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """[world, *t.shape] on the CPU, rank r's ``t`` in row r; a lost peer raises :class:`SparseZOError`."""
        self._settle()
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._held = [(x, x._use_count()) for x in (t, *out)]
        t0 = time.perf_counter()
        try:
            dist.all_gather(out, t)
        except RuntimeError as e:  # DistBackendError, DistNetworkError: closed connection or timeout
            raise self._failed(what, e) from e
        self.comm_seconds += time.perf_counter() - t0
        self.comm_bytes += 2 * (self.world - 1) * t.nbytes  # own part out to W-1 peers, theirs in
        return torch.stack(out).cpu()

    def barrier(self, what: str) -> None:
        try:
            dist.barrier()
        except RuntimeError as e:
            raise self._failed(what, e) from e

    def mean(self, local_mean: float, examples: int, what: str) -> float:
        """The example-weighted mean over all ranks, summed in rank order (identical on every rank)."""
        got = self.all_gather(torch.tensor([local_mean * examples, examples], dtype=torch.float64), what).tolist()
        return sum(s for s, _ in got) / sum(n for _, n in got)

    def from_main(self, value: float, what: str) -> float:
        """Rank 0's ``value`` on every rank, so decisions taken on it (best dev θ) agree everywhere."""
        return self.all_gather(torch.tensor([value], dtype=torch.float64), what)[0, 0].item()

    def check_same(self, parts: dict[str, bytes]) -> None:
        """Raise on every rank unless all ranks hold byte-identical ``parts`` (compared by 64-bit hashes)."""
        names = list(parts)
        mine = torch.tensor([int.from_bytes(hashlib.sha256(parts[n]).digest()[:8], "little", signed=True)
                             for n in names], dtype=torch.int64)
        got = self.all_gather(mine, "the start-up check")
        bad = [f"the {n} (rank {', '.join(str(r) for r in range(self.world) if got[r, j] != got[0, j])} vs rank 0)"
               for j, n in enumerate(names) if bool((got[:, j] != got[0, j]).any())]
        if bad:
            raise SparseZOError("training processes disagree on " + "; ".join(bad) + ": every process must load "
                                "the same model, mask and data (same arguments and files on every node)")

    def _settle(self, limit: float = 1.0) -> None:
        """Let go of the last collective's tensors once gloo's worker thread has (at most ``limit`` s).

        The worker drops its references a little after the call returns. Were it the last owner
        of a tensor Python no longer holds, freeing it would need the GIL, and a process exiting
        right after its last collective aborts in interpreter shutdown ("terminate called without
        an active exception": 1 exit in 3 to 10 here before this). Waiting right after every call
        costs a thread wake-up (~4 ms on a busy CPU); by the next call or ``close`` it is long done.
        NCCL's watchdog thread holds on far longer: not waited for.
        """
        end = time.perf_counter() + limit
        while (self.device.type == "cpu" and any(x._use_count() > n for x, n in self._held)
               and time.perf_counter() < end):
            time.sleep(0)
        self._held = []

    def close(self) -> None:
        self._settle()
        if dist.is_initialized():
            dist.destroy_process_group()


def check_split(parallel: str, world: int, q: int, batch_size: int | None = None) -> None:
    """Refuse work that cannot be split evenly enough over ``world`` processes."""
    if parallel not in PARALLEL:
        raise SparseZOError(f"--parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "data" and batch_size is not None and batch_size < world:
        raise SparseZOError(f"--parallel data splits each batch over the processes: --batch-size {batch_size} "
                            f"is smaller than the {world} processes")
    if parallel == "query" and q % world:
        raise SparseZOError(f"--parallel query gives each process the same number of queries: --q {q} is not a "
                            f"multiple of the {world} processes")


def check_one_process(lr_auto: bool, optimizer: str) -> None:
    """What runs in one process only: --lr auto's probe, and the optimisers that measure L(θ) (hizoo, fzoo)."""
    if lr_auto:
        raise SparseZOError("--lr auto (train's default) runs in one process: pass a number with --lr for --nproc "
                            "runs (e.g. the lr a one-process --lr auto run recorded in its config.json)")
    if OPTIMIZERS[optimizer].needs_center:
        raise SparseZOError(f"--optimizer {optimizer} runs in one process only; use another optimizer with --nproc")


def check_consistent(ctx: DistContext, model, params: TrainableParams, cfg, train: list, dev: list,
                     theta: torch.Tensor, opt_state: dict[str, torch.Tensor]) -> None:
    """All ranks must start from the same model, mask, θ (and optimiser state), settings and data."""
    def tensor_bytes(*ts: torch.Tensor) -> bytes:
        return b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in ts)

    data = [[e.prompt, e.candidates, e.gold, e.answers] for e in [*train, *dev]]
    ctx.check_same({
        "model": json.dumps(model_fingerprint(model), sort_keys=True).encode(),
        "mask": params.mask.digest().encode(),  # θ's layout follows from model + mask (model order)
        "trainable values": tensor_bytes(theta, *(opt_state[k] for k in sorted(opt_state))),
        "settings": json.dumps(asdict(cfg), sort_keys=True).encode(),
        "data": json.dumps(data).encode(),
    })


class DistributedEngine(ZOEngine):
    """:class:`ZOEngine` whose step is spread over the ranks of ``ctx`` (see the module docstring)."""

    def __init__(self, params: TrainableParams, cfg: ZOConfig, total_steps: int, ctx: DistContext,
                 cache_bytes: int = 1 << 30):
        super().__init__(params, cfg, total_steps, cache_bytes)
        check_split(ctx.parallel, ctx.world, cfg.q)
        self.ctx = ctx

    def step(self, step: int, loss_fn: Callable[[], float], examples: int = 1) -> StepRecord:
        """One step; ``loss_fn`` is this rank's mean loss over its ``examples`` (data-parallel)."""
        if self.ctx.parallel == "data":
            return super().step(step, lambda: self.ctx.mean(loss_fn(), examples, f"step {step}"))
        return self._query_step(step, loss_fn)

    def _query_step(self, step: int, loss_fn: Callable[[], float]) -> StepRecord:
        q, w = self.cfg.q, self.ctx.world
        mine = []
        for i in range(self.ctx.rank, q, w):  # query i = k·W + rank
            seed = step_seed(self.cfg.seed, step, i)
            lp, lm = self.perturbed_losses(seed, loss_fn)
            mine.append(torch.tensor([lp, lm], dtype=torch.float64).view(torch.int64).tolist() + [seed])
        # float64 losses travel as their int64 bit patterns, next to the int64 seed: one exact exchange
        got = self.ctx.all_gather(torch.tensor(mine, dtype=torch.int64), f"step {step}")  # [W, q/W, 3]
        rows = got.transpose(0, 1).reshape(q, 3)  # row k·W + r = query k·W + r
        seeds = rows[:, 2].tolist()
        if seeds != [step_seed(self.cfg.seed, step, i) for i in range(q)]:
            raise SparseZOError(f"training processes are out of step at step {step} (their seeds differ)")
        lps, lms = rows[:, :2].contiguous().view(torch.float64).T.tolist()
        return self.finish(step, seeds, lps, lms)


def init_from_env(parallel: str, timeout_s: float, device: str) -> DistContext | None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK); ``None`` when not started by torchrun. NCCL on CUDA (one GPU per
    local rank), gloo on CPU."""
    if "WORLD_SIZE" not in os.environ:
        return None
    if parallel not in PARALLEL:
        raise SparseZOError(f"--parallel must be one of {PARALLEL}, got {parallel!r}")
    if timeout_s <= 0:
        raise SparseZOError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # no MASTER_ADDR, unreachable master, rendezvous timeout
        raise SparseZOError(f"could not join the torch.distributed process group ({backend}): {e}; "
                            "start the processes with torchrun or sparsezo train --nproc N") from e
    return DistContext(dist.get_rank(), dist.get_world_size(), parallel,
                       torch.device(f"cuda:{local}" if cuda else "cpu"), timeout_s)


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``sparsezo <argv>`` as ``nproc`` processes on this machine through torchrun's launcher.

    Each process gets an equal share of the CPU cores as its thread count unless OMP_NUM_THREADS
    is set (torchrun alone would give each one thread).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    config = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "sparsezo.cli"])
    config.training_script_args = argv  # not parsed by torchrun: it would take --nproc for its own --nproc-per-node
    try:
        run(config)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        raise SparseZOError(f"{len(e.failures)} of the {nproc} training processes failed (exit code "
                            f"{', '.join(map(str, codes))}); their errors are above") from None
