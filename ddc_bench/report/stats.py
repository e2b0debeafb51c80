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


def cohens_d(a: Iterable[float], b: Iterable[float]) -> float:
    """Effect size of ``mean(a) - mean(b)``: Hedges' g, i.e. Cohen's d (difference over the
    pooled sample std) times the small-sample correction 1 - 3 / (4 (n_a + n_b) - 9). NaN
    with fewer than two finite values on a side; ±inf when both sides are constant and
    differ (no noise at all)."""
    x = np.array([float(v) for v in a if v is not None], dtype=float)
    y = np.array([float(v) for v in b if v is not None], dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) < 2 or len(y) < 2:
        return math.nan
    diff = float(x.mean() - y.mean())
    pooled = math.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1))
                       / (len(x) + len(y) - 2))
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled * (1 - 3 / (4 * (len(x) + len(y)) - 9))


@dataclass(frozen=True)
class CountTest:
    """Fisher's exact test of ``k_a of n_a`` against ``k_b of n_b`` (e.g. seeds that
    grokked): ``p_greater`` is the one-sided p-value of "a's rate is higher than b's",
    ``p_two_sided`` the two-sided one."""

    k_a: int
    n_a: int
    k_b: int
    n_b: int
    p_greater: float
    p_two_sided: float

    @property
    def min_p_greater(self) -> float:
        """The smallest one-sided p-value these sample sizes allow (a split of n_a of n_a
        against 0 of n_b): whether the design could show the effect at all."""
        return fisher_counts(self.n_a, self.n_a, 0, self.n_b).p_greater


def fisher_counts(k_a: int, n_a: int, k_b: int, n_b: int) -> CountTest:
    """:class:`CountTest` of the 2×2 table ``[[k_a, n_a - k_a], [k_b, n_b - k_b]]``
    (``scipy.stats.fisher_exact``). Raises ValueError on counts outside 0..n."""
    for k, n in ((k_a, n_a), (k_b, n_b)):
        if not 0 <= k <= n:
            raise ValueError(f"count {k} of {n}: need 0 <= count <= n")
    table = [[k_a, n_a - k_a], [k_b, n_b - k_b]]
    greater = float(sps.fisher_exact(table, alternative="greater").pvalue)
    two = float(sps.fisher_exact(table, alternative="two-sided").pvalue)
    return CountTest(k_a, n_a, k_b, n_b, greater, two)
