"""``train --tensorboard DIR``: the metrics.jsonl rows as TensorBoard scalars.

People watch training curves in TensorBoard; the JSONL file stays the record (``plot`` and
``--resume`` read it). Every row that :func:`sparsezo.fine_tune` logs is mirrored: per step
``train/loss``, ``train/projected_grad`` (the mean over the step's queries) and ``train/lr``; per
dev evaluation ``dev/<metric>``. The ``tensorboard`` package is an optional extra
(``pip install 'sparsezo[tensorboard]'``), checked before training starts.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import SparseZOError

_SKIP = ("step", "seed", "dev_loss_se")  # the seeds are not scalars; the dev loss's standard error is not a curve


def require_tensorboard() -> None:
    """Fail in a second, not after training, when the writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise SparseZOError("--tensorboard needs the tensorboard package: pip install 'sparsezo[tensorboard]' "
                            "(or pip install tensorboard), or drop --tensorboard") from e


class TensorBoardLog:
    """Writes metrics rows to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str | os.PathLike):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: a ZO step (loss, grad, lr) or a dev evaluation (dev_*)."""
        step = int(row["step"])
        for key, value in row.items():
            if key in _SKIP:
                continue
            if isinstance(value, list):  # one projected gradient per SPSA query
                if not value:
                    continue
                value = sum(value) / len(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"dev/{key[4:]}" if key.startswith("dev_") else f"train/{'projected_grad' if key == 'grad' else key}"
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
