"""The training loop's settings (:class:`TrainConfig`) and what a fine-tune returns (:class:`TrainResult`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from ..errors import SparseZOError
from ..eval.scoring import LOSSES
from ..zo import ZOConfig
from ..zo.registry import OPTIMIZERS
from ..zo.trajectory import Trajectory

FUSED_PM = ("auto", "on", "off")
# --fused-pm auto fuses a step's two forwards on a 4-bit base when its batch holds at most this many
# token positions. Measured on the idle 2-core CPU (benchmarks/README.md), fused step / two forwards:
# 0.72-0.84 at 1 x 32 tokens (7B-architecture int4, SmolLM2 int4 and nf4), but 1.5 at 1 x 256, 1.1
# (7B) and 1.8-2.8 (SmolLM2) at 16 x 64-256, and no gain on bf16 (1.0 at 1 x 32, 2.4 at batch 16):
# a doubled forward is cheaper than two only while the base matmul is bound by reading or
# dequantizing the weights rather than by its rows.
FUSED_AUTO_TOKENS = 64


@dataclass
class TrainConfig:
    """The loop's own settings; the optimiser's are in :class:`ZOConfig`."""

    steps: int = 500
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 32
    loss: str = "ce"
    keep_best: bool = True  # MeZO: return the θ with the best dev accuracy, not the last one
    fused_pm: str = "auto"  # both perturbed forwards as one stacked forward (zo/fused.py): on, off, or auto
    bucket: bool = True  # a step's loss over length-bucketed micro-batches (eval.scoring.micro_batches): no padding cost
    cuda_graphs: bool = False  # the unfused steps' decoder forward replayed as CUDA graphs (eval/graphs.py); CUDA only
    zo: ZOConfig = field(default_factory=ZOConfig)
    lr_auto: bool = False  # probe lr_grid on a dev subset first (see probe_lr); the result's zo.lr is the choice
    lr_grid: tuple[float, ...] | None = None  # --lr auto's candidates (None: the optimiser's own grid)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Integral):
                raise SparseZOError(f"--{name.replace('_', '-')} must be a whole number, got {getattr(self, name)!r}")
            if getattr(self, name) <= 0:
                raise SparseZOError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise SparseZOError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.lr_grid is not None and not (self.lr_grid and all(math.isfinite(v) and v > 0 for v in self.lr_grid)):
            raise SparseZOError(f"the --lr auto grid must hold finite lrs > 0, got {self.lr_grid}")
        self.zo.validate()
        if self.fused_pm not in FUSED_PM:
            raise SparseZOError(f"--fused-pm must be one of {', '.join(FUSED_PM)}, got {self.fused_pm!r}")
        if self.fused_pm == "on" and OPTIMIZERS[self.zo.optimizer].one_sided:
            raise SparseZOError(f"--fused-pm scores θ+εz and θ−εz together, but --optimizer {self.zo.optimizer} "
                                "measures one-sided L(θ+εz) − L(θ) (no ±ε pair to fuse); drop --fused-pm")


@dataclass
class TrainResult:
    best_step: int
    best_dev: float  # best dev value of the task metric (accuracy, or F1 for generation tasks)
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    trajectory: Trajectory
    start_dev: float  # the dev value at step 0 (the base model)
    dev_noise: float  # its standard error (see :func:`sparsezo.training.outcome.improvement`)
    improved: bool  # best_dev > start_dev + IMPROVED_SE · dev_noise (at the ceiling: the dev loss fell beyond noise)
    lr_probe: dict[str, Any] | None  # --lr auto's report (candidates, dev losses, choice, forwards), or None
    zo: ZOConfig  # the optimiser settings the run trained with: the config's, with --lr auto's chosen lr
    best_loss: float | None = None  # dev loss of the selected θ (classification tasks; None for generation)
    at_ceiling: bool = False  # the step-0 dev value left no room for a gain beyond noise: judged on the dev loss

    @property
    def lr(self) -> float:
        """The lr the run trained with (with --lr auto: the probe's choice)."""
        return self.zo.lr
