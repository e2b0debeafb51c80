"""Statistics over seeds: mean, std, a 95% confidence interval, and Welch's t-test.

Seeds are independent repetitions of one setting; every interval here is over seeds, with
Student's t quantile (``scipy.stats.t``), which stays honest for the 2-5 seeds a sweep
affords (a normal quantile would make the interval too narrow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: Two-sided level of the intervals and of "within seed noise".
CONFIDENCE = 0.95


@dataclass(frozen=True)
class SeedStats:
    """Mean, sample std (ddof=1) and 95% t-interval half-width of ``n`` finite values;
    NaN where undefined (no value; std and interval need two)."""

    n: int
    mean: float
    std: float
    ci95: float

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


def seed_stats(values: Iterable[float]) -> SeedStats:
    """:class:`SeedStats` of the finite ``values`` (NaN/inf/None are left out)."""
    x = np.array([float(v) for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return SeedStats(0, math.nan, math.nan, math.nan)
    if n == 1:
        return SeedStats(1, float(x[0]), math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return SeedStats(n, float(x.mean()), std, half)


@dataclass(frozen=True)
class Comparison:
    """Welch's t-test of ``mean(a) - mean(b)`` over seeds."""

    diff: float
    p_value: float          # two-sided; NaN when a side has fewer than two seeds
    ci95: tuple[float, float]  # Welch 95% interval on the difference (NaN when undefined)

    @property
    def within_noise(self) -> bool | None:
        """True when the difference is not significant at 5% (the interval holds 0); None
        when there are too few seeds to tell."""
        if not math.isfinite(self.p_value):
            return None
        return self.p_value >= 1 - CONFIDENCE


def welch(a: Iterable[float], b: Iterable[float]) -> Comparison:
    """Welch's unequal-variance t-test between two settings' per-seed values."""
    x = np.array([float(v) for v in a if v is not None], dtype=float)
    y = np.array([float(v) for v in b if v is not None], dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if not len(x) or not len(y):
        return Comparison(math.nan, math.nan, (math.nan, math.nan))
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Comparison(diff, math.nan, (math.nan, math.nan))
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:  # identical constant samples: no noise at all
        p = 1.0 if diff == 0 else 0.0
        return Comparison(diff, p, (diff, diff))
    dof = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    t = diff / se
    p = float(2 * sps.t.sf(abs(t), dof))
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, dof)) * se
    return Comparison(diff, p, (diff - half, diff + half))
