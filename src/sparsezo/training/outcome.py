"""Did a fine-tune learn anything? Dev selection's tie-break and the verdict a run reports.

The dev metric (accuracy, F1) is bounded: a split the base already gets (almost) all right
cannot show a gain beyond noise, and every later evaluation ties with step 0 at best.
Classification tasks also report the dev loss (cross-entropy over the candidates, free once
they are scored), which keeps moving there: at the ceiling, selection breaks ties on it and the
verdict is taken on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..hints import setting

IMPROVED_SE = 2.0  # "improved" = best dev above the step-0 dev by more than this many standard errors


def better(value: float, loss: float | None, best_value: float, best_loss: float | None, at_ceiling: bool) -> bool:
    """Whether an evaluation beats the best so far: a higher dev metric or, when the metric is at its
    ceiling (see :func:`at_ceiling`), an equal one with a lower dev loss.

    Below the ceiling ties keep the earlier θ, as before: there a loss that differs in its last bits
    must not move the selection off the base when nothing was learned."""
    if value != best_value:
        return value > best_value
    return at_ceiling and loss is not None and best_loss is not None and loss < best_loss


def start_row(history: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(the dev metric's key, the step-0 dev row) of a run's history: the value every verdict is judged against."""
    row = next(r for r in history if r["step"] == 0 and any(_is_metric(k) for k in r))
    return next(k for k in row if _is_metric(k)), row


def at_ceiling(start: float, n: int) -> bool:
    """Whether a step-0 dev value leaves no room for a gain beyond noise: even a perfect score would
    not beat it by IMPROVED_SE standard errors (e.g. 100% of 200, or 99% of 100)."""
    return start + IMPROVED_SE * improvement(start, start, 0, n)[0] >= 1.0


def improvement(start: float, best: float, best_step: int, n: int) -> tuple[float, bool]:
    """(standard error of the step-0 dev value, whether ``best`` beats it by more than IMPROVED_SE of them).

    The dev metric is a mean of ``n`` per-example scores in [0, 1] (accuracy, F1), whose
    variance is at most p(1 − p) — the binomial one for accuracy. p is the Agresti–Coull-style
    (x + 1)/(n + 2), so a step-0 value of 0 or 1 still has noise. Two standard errors, not one:
    the best of several noisy evaluations beats the first by about one on its own, with no
    learning at all. A run whose best is step 0 never improved.
    """
    p = (start * n + 1) / (n + 2)
    se = math.sqrt(p * (1 - p) / max(n, 1))
    return se, best_step > 0 and best - start > IMPROVED_SE * se


@dataclass(frozen=True)
class Outcome:
    """The verdict on a run: the step-0 dev value and its noise, whether the best θ beat it, and
    whether the metric was at its ceiling (no gain could clear the noise: the verdict is the loss's)."""

    key: str  # the dev metric's history key, e.g. "dev_accuracy"
    start: float
    noise: float
    best: float
    best_step: int
    n: int
    start_loss: float | None
    loss_noise: float | None
    best_loss: float | None
    ceiling: bool
    improved: bool

    @classmethod
    def of(cls, history: list[dict[str, Any]], best_step: int, best: float, best_loss: float | None,
           n: int) -> Outcome:
        """The verdict from a run's metrics history (its step-0 dev row) and its selected best."""
        key, row = start_row(history)
        start, start_loss, loss_noise = row[key], row.get("dev_loss"), row.get("dev_loss_se")
        noise, improved = improvement(start, best, best_step, n)
        ceiling = at_ceiling(start, n)
        if ceiling and start_loss is not None and best_loss is not None:
            improved = best_step > 0 and best_loss < start_loss - IMPROVED_SE * (loss_noise or 0.0)
        return cls(key, start, noise, best, best_step, n, start_loss, loss_noise, best_loss, ceiling, improved)

    def explain(self, history: list[dict[str, Any]], lr: float, probed: bool = False) -> str:
        """Why the run counts as not improved, and what to try (``probed``: ``lr`` was --lr auto's choice)."""
        metric = self.key[4:]
        if self.ceiling:
            where = (f"dev {metric} was already {self.start:.4f} at step 0, at its ceiling for {self.n} dev examples "
                     f"(±{self.noise:.4f}): no gain in it could show learning")
            if self.start_loss is None:
                return f"{where}; use a harder or larger dev set ({setting('num_dev')})"
            return (f"{where}, and the dev loss did not fall beyond noise ({self.start_loss:.4f} at step 0, "
                    f"{self.best_loss:.4f} at step {self.best_step}, ±{self.loss_noise or 0:.4f}); "
                    f"{'the result is the base model' if self.best_step == 0 else 'the gain is within noise'}. "
                    f"The task may be too easy for this model; otherwise {self._lr_hint(history, lr, probed)}")
        return (f"best dev {metric} {self.best:.4f} at step {self.best_step} vs {self.start:.4f} at step 0 (noise "
                f"±{self.noise:.4f} over {self.n} dev examples): "
                f"{'the result is the base model' if self.best_step == 0 else 'the gain is within noise'}; "
                f"{self._lr_hint(history, lr, probed)}")

    def _lr_hint(self, history: list[dict[str, Any]], lr: float, probed: bool) -> str:
        """Lower lr when the dev value fell, else either way.

        A flat dev curve is ambiguous: a too-small lr gives one, and so can a too-large one (lr 1e-3
        kept SmolLM2's SST-2 dev within noise for 400 steps, where 1e-4 learned;
        benchmarks/convergence.py).
        """
        later = [r[self.key] for r in history if self.key in r and r["step"] > 0]
        fell = bool(later) and min(later) < self.start - IMPROVED_SE * self.noise
        what = (f"the dev value fell below the base's: lr {lr:g} is too large, try {setting('lr', lr / 3)}" if fell else
                f"the dev value stayed within noise: try {setting('lr', lr * 3)} or more {setting('steps')} (or "
                f"{setting('lr', lr / 3)}: a too-large lr can also keep dev flat, its noise cancelling what it learns)")
        if probed:
            return f"{what} ({setting('lr_auto')} chose lr {lr:g})"
        return f"{what}, or {setting('lr_auto')} to probe a grid of lrs first"


def _is_metric(key: str) -> bool:
    """A dev-metric key of a metrics row (dev_accuracy, dev_f1), not the dev loss or its noise."""
    return key.startswith("dev_") and not key.startswith("dev_loss")
