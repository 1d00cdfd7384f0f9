"""Small statistics shared by the benchmarks: a Student-t interval over a handful of seeds."""

from __future__ import annotations

import math

import numpy as np


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student-t quantile by bisection on the numerically integrated density.

    Per-task checks have n = 3 seeds, where the normal 1.96 would give a ~2x too narrow
    interval (t_0.975 with 2 df is 4.30); scipy is not a dependency, and a table of constants
    or a new package for one number is worse than integrating the density.
    """
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        ys = np.exp(logc - (df + 1) / 2 * np.log1p(np.linspace(0.0, x, 20001) ** 2 / df))
        return 0.5 + float((ys[:-1] + ys[1:]).sum()) * x / 20000 / 2  # trapezoid rule

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


# below this spread the differences are equal up to rounding (accuracies are multiples of 1/n_test)
NO_SPREAD = 1e-9


def paired(d: list[float]) -> dict:
    """Mean paired difference with a 95% Student-t interval and the verdict it supports.

    Equal differences (two seeds whose test accuracies both differ by exactly 1/300, say: accuracies
    are quantised, so it happens) have no spread to estimate the interval from; their interval is
    unbounded rather than zero-width, which would call any such difference significant."""
    if not d:
        return {"n": 0}
    m = float(np.mean(d))
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    half = t_quantile(len(d) - 1) * sd / math.sqrt(len(d)) if sd > NO_SPREAD else float("inf")
    verdict = "a better" if m - half > 0 else "a worse" if m + half < 0 else "no significant difference"
    return {"n": len(d), "mean_diff": m, "ci95": half, "verdict": verdict}
