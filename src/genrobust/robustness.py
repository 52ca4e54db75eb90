"""Effective robustness: accuracy on a shift above the logit-linear fit of baseline models.

Fit logit(y) = a * logit(x) + b over baseline points (x = in-distribution accuracy on the shift's class
subset, y = shift accuracy); ER = y - sigmoid(a * logit(x) + b) (Taori et al., 2020).
"""
import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)
CLIP = 1e-4  # accuracies of exactly 0 or 1 have an infinite logit; they are clipped to [CLIP, 1 - CLIP]


def logit(p):
    p = np.clip(np.asarray(p, dtype=float), CLIP, 1 - CLIP)
    return np.log(p / (1 - p))


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


@dataclass(frozen=True)
class Line:
    """A logit-linear baseline: logit(y) = slope * logit(x) + intercept, fitted on `n` points."""

    slope: float
    intercept: float
    n: int

    def predict(self, x):
        return sigmoid(self.slope * logit(x) + self.intercept)


def fit_line(x, y):
    """Least-squares fit in logit space; needs at least 3 baseline points with distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"baseline x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 3:
        raise ValueError(f"an effective-robustness line needs at least 3 baseline models, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("baseline accuracies contain NaN or inf; fix the results rows")
    clipped = int(((x <= 0) | (x >= 1) | (y <= 0) | (y >= 1)).sum())
    if clipped:
        logger.warning("%d baseline points at accuracy 0 or 1 were clipped to [%g, %g] for the logit",
                       clipped, CLIP, 1 - CLIP)
    lx, ly = logit(x), logit(y)
    if np.ptp(lx) == 0:
        raise ValueError("all baseline models have the same in-distribution accuracy; the line is undefined")
    slope, intercept = np.polyfit(lx, ly, 1)
    return Line(float(slope), float(intercept), len(x))


def effective_robustness(x, y, line):
    """Measured shift accuracy minus the line's prediction at the model's ID accuracy."""
    return float(np.asarray(y, dtype=float) - line.predict(x))


def bootstrap_interval(bx, by, x, y, n=1000, level=0.95, seed=0):
    """Percentile interval of ER over refits of the line on baseline points resampled with replacement."""
    rng = np.random.default_rng(seed)
    bx, by = np.asarray(bx, dtype=float), np.asarray(by, dtype=float)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(bx), len(bx))
        if np.ptp(logit(bx[idx])) == 0:
            continue  # a resample of one repeated point defines no line
        line = Line(*map(float, np.polyfit(logit(bx[idx]), logit(by[idx]), 1)), len(idx))
        values.append(effective_robustness(x, y, line))
    if not values:
        raise ValueError("no bootstrap resample defined a line; add baseline models with distinct accuracies")
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def relative_robustness(y, y_reference):
    """Shift accuracy gained over a named reference model (e.g. the real-only baseline)."""
    if math.isnan(y) or math.isnan(y_reference):
        raise ValueError("relative robustness of a NaN accuracy")
    return float(y - y_reference)
