"""``sparsezo plot``: loss and dev curves of a run as a PNG, from its metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..plot import plot_metrics
from .common import emit
from .options import add_command, add_json_arg


def register(sub) -> None:
    p = add_command(sub, "plot", "loss and dev curves of a run as a PNG, from its metrics.jsonl (needs matplotlib)")
    p.add_argument("run_dir", help="run directory written by train or demo --out")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Curves of any run with a metrics.jsonl: finished, interrupted or still training."""
    run_dir = Path(args.run_dir)
    out = plot_metrics(run_dir / "metrics.jsonl", Path(args.out) if args.out else run_dir / "curves.png",
                       title=str(run_dir))
    emit(args, {"out": str(out)}, f"loss and dev curves of {run_dir} -> {out}")
