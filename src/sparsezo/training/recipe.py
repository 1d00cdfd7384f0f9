"""The fine-tuning recipe's defaults, in one place for ``sparsezo train``, ``sparsezo demo`` and the API.

There are two named recipes, and every difference between them is here, so the help texts,
the README and the code cannot drift apart:

- :data:`TRAIN` — ``sparsezo train``'s defaults (MeZO's protocol: 1000 train / 500 dev
  examples, 1000 steps; a 32,768-token Fisher estimate), with ``--lr auto``: the best fixed lr
  moves by decades between models, masks and tasks (SmolLM2's SST-2 lr 1e-4 learned nothing on
  a 270M model of another family, which learned at 3e-5), and the probe costs at most 10% of the
  run's forwards.
- :data:`DEMO` — ``sparsezo demo`` and the README's API example: the same recipe cut for a short
  first run — 400 steps, 200 dev examples and 8,192 calibration tokens (a noisier Fisher score
  and dev selection, in exchange for a run a new user waits for) — at the fixed lr 1e-4 that was
  searched for its one model and task (no probe to pay for).

Changing a value here changes results (the demo's numbers in the README were measured with
:data:`DEMO`), so treat these as part of the recorded experiments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..zo import ZOConfig
from .config import TrainConfig


DEFAULT_LR = 1e-4  # also what ZOConfig.lr holds for --lr auto until the probe has chosen


@dataclass(frozen=True)
class Recipe:
    """Task, mask and optimiser settings of a sensitive-sparse ZO fine-tune."""

    task: str = "sst2"
    mask: str = "sensitive"
    density: float = 1e-3  # fraction of eligible weights trained (SensZOQ's 0.1%)
    calib_tokens: int = 32768  # WikiText-2 tokens the Fisher score is estimated on
    calib_seq_len: int = 256  # tokens per calibration row (not the task's prompt length)
    num_train: int = 1000
    num_dev: int = 500
    num_test: int = 1000
    steps: int = 1000
    lr: float | None = None  # None: --lr auto (fine_tune probes first and returns the lr it chose)
    eps: float = 1e-2  # >= 1e-2 survives bf16 rounding of θ ± εz
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 32
    seed: int = 0

    def train_config(self, zo: dict[str, Any] | None = None, **loop: Any) -> TrainConfig:
        """The training loop's settings of this recipe, validated: ``zo`` and ``loop`` set the ZO and loop
        options the recipe leaves at their defaults (``sparsezo train``'s --optimizer, --q, --loss, ...).

        This is the one place ``lr = None`` (``--lr auto``) becomes the loop's ``lr_auto``.
        """
        cfg = TrainConfig(steps=self.steps, batch_size=self.batch_size, eval_every=self.eval_every,
                          eval_batch_size=self.eval_batch_size, lr_auto=self.lr is None, **loop,
                          zo=ZOConfig(lr=DEFAULT_LR if self.lr is None else self.lr, eps=self.eps, seed=self.seed,
                                      **(zo or {})))
        cfg.validate()
        return cfg


TRAIN = Recipe()
DEMO = replace(TRAIN, steps=400, num_dev=200, calib_tokens=8192, lr=DEFAULT_LR)
