"""The statistics of the comparison report: pure functions of plain numbers (numpy and scipy only).

- `describe`: n, mean, sample std (n − 1 in the denominator) and the confidence interval of the
  mean, mean ± t_{(1+level)/2, n−1} · s / √n. With n = 1 neither the std nor the interval exists;
  they are None, never a made-up zero.
- `paired_test`: a method against the baseline on the seeds both have; the two-sided paired t-test
  (`scipy.stats.ttest_rel`) and the interval of the mean difference. With fewer than 2 pairs, or
  differences of zero variance (identical runs, or a metric at its ceiling in both), t and p are
  undefined (None) and the reason is given.
- `holm`: Holm's step-down adjustment of a family of p-values (one family per metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95  # confidence level of every interval in the report
# Differences whose spread is below this (relative to their size) are treated as constant: the
# t statistic would be float round-off divided by round-off.
_ZERO_SPREAD = 1e-12


@dataclass(frozen=True)
class Summary:
    """n, mean, sample std and confidence interval of one metric over seeds."""

    n: int
    mean: float | None
    std: float | None  # None when n < 2
    ci: tuple[float, float] | None  # None when n < 2
    note: str = ""  # why std or ci is missing

    def to_json(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std,
                "ci": list(self.ci) if self.ci else None, "note": self.note or None}


@dataclass(frozen=True)
class PairedTest:
    """A cell minus its baseline cell over the seeds both have (positive: above the baseline)."""

    seeds: tuple[str, ...]
    mean_diff: float | None
    ci: tuple[float, float] | None
    t: float | None
    p: float | None
    note: str = ""  # why t and p (or the interval) are missing

    @property
    def n(self) -> int:
        return len(self.seeds)


def t_interval(mean: float, std: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of a mean from n samples with sample std `std` (n − 1 df)."""
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return float(mean - half), float(mean + half)


def describe(values: Sequence[float], level: float = LEVEL) -> Summary:
    xs = np.asarray(values, dtype=float)
    n = int(xs.size)
    if n == 0:
        return Summary(0, None, None, None, "no values")
    mean = float(xs.mean())
    if n == 1:
        return Summary(1, mean, None, None, "n = 1: std and confidence interval undefined")
    std = float(xs.std(ddof=1))
    return Summary(n, mean, std, t_interval(mean, std, n, level))


def _constant(d: np.ndarray) -> bool:
    return float(d.std(ddof=1)) <= _ZERO_SPREAD * max(1.0, float(np.abs(d).max()))


def paired_test(values: dict[str, float], baseline: dict[str, float],
                level: float = LEVEL) -> PairedTest:
    """Pair `values` with `baseline` by seed (only seeds both have) and test the difference."""
    seeds = tuple(s for s in values if s in baseline)
    if not seeds:
        return PairedTest((), None, None, None, None, "no seed in common with the baseline")
    a = np.array([values[s] for s in seeds], dtype=float)
    b = np.array([baseline[s] for s in seeds], dtype=float)
    d = a - b
    mean = float(d.mean())
    if len(seeds) < 2:
        return PairedTest(seeds, mean, None, None, None,
                          "1 pair: t-test and confidence interval undefined")
    ci = t_interval(mean, float(d.std(ddof=1)), len(seeds), level)
    if _constant(d):
        return PairedTest(seeds, mean, ci, None, None,
                          "differences have zero variance: t-test undefined")
    res = stats.ttest_rel(a, b)
    return PairedTest(seeds, mean, ci, float(res.statistic), float(res.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    With the m p-values sorted ascending, p_(1) ≤ ... ≤ p_(m): adj_(i) = max_{j ≤ i} min(1,
    (m − j + 1) · p_(j)), which keeps the adjusted values in the order of the raw ones.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted
