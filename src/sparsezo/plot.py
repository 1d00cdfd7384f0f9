"""Training curves of a run as a PNG: ZO loss and the dev metric against the step, from ``metrics.jsonl``.

Read from the metrics file rather than kept in memory, so ``sparsezo plot RUN`` works on any
run, finished, interrupted or still training. matplotlib is an optional extra (``[plot]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SparseZOError
from .io import atomic_path

SMOOTHING = 0.95  # the running loss the training bar shows: ZO losses of single batches are noisy


def read_metrics(path: str | os.PathLike) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(step, loss) rows and, per ``dev_*`` metric, its (step, value) rows of a metrics.jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise SparseZOError(f"no metrics file at {path}; pass a run directory written by sparsezo train or demo --out")
    losses: list[tuple[int, float]] = []
    dev: dict[str, list[tuple[int, float]]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SparseZOError(f"{path} line {i} is not valid JSON ({e})") from e
        if "loss" in row:
            losses.append((row["step"], row["loss"]))
        for k, v in row.items():
            if k.startswith("dev_"):
                dev.setdefault(k, []).append((row["step"], v))
    if not losses and not dev:
        raise SparseZOError(f"{path} holds no loss or dev rows yet; nothing to plot")
    return losses, dev


def require_matplotlib():
    """matplotlib's pyplot on the file-only Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SparseZOError("plotting needs matplotlib: pip install 'sparsezo[plot]' (or: pip install matplotlib)") \
            from e
    return plt


def plot_metrics(metrics: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Write the loss curve (raw and smoothed) and the dev curve(s) side by side to ``out`` (PNG, atomic)."""
    plt = require_matplotlib()
    losses, dev = read_metrics(metrics)
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        steps, values = zip(*losses)
        running, smooth = values[0], []
        for v in values:
            running = SMOOTHING * running + (1 - SMOOTHING) * v
            smooth.append(running)
        ax_loss.plot(steps, values, color="0.75", linewidth=0.8, label="batch loss")
        ax_loss.plot(steps, smooth, color="C0", label=f"running mean ({SMOOTHING})")
        ax_loss.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="training loss (mean of L+ and L-)", title="ZO loss")
    for name, rows in dev.items():
        ax_dev.plot(*zip(*rows), marker="o", label=name)
    if dev:
        ax_dev.legend(fontsize=8)
    ax_dev.set(xlabel="step", ylabel="dev metric", title="dev evaluation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
