"""Statistics for comparing runs across seeds: mean, standard deviation, a Student-t confidence
interval and a paired t-test (docs/statistics.md).

For values x_1..x_n of one metric (one configuration, n seeds):

    mean  m = (1/n) sum x_i
    std   s = sqrt( sum (x_i - m)^2 / (n - 1) )          (sample standard deviation, n-1 dof)
    95% CI  m +- t_{0.975, n-1} * s / sqrt(n)            (Student t quantile, n-1 degrees of freedom)

The interval covers the configuration's true mean in 95% of repetitions when the per-seed values
are independent and roughly normal (Student 1908; any statistics text, e.g. Wasserman, *All of
Statistics*, 6.3). With n = 1 there is no spread to estimate: std and interval are None.

Paired t-test of configuration A against a baseline B over the seeds both ran (pair i = the same
seed, hence the same adapter initialisation and data order):

    d_i = a_i - b_i,   t = mean(d) / (std(d) / sqrt(k)),   k pairs, k - 1 dof,
    p = 2 * P(T_{k-1} > |t|)                               (two-sided)

Pairing removes the part of the seed-to-seed variation the two configurations share. Same as
``scipy.stats.ttest_rel``. With k < 2 pairs there is no test (t and p None); when every pair
differs by the same amount the test is degenerate: p = 1 for no difference, else t = +-inf, p = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, count and the t-interval's half-width of some values."""

    mean: float
    std: float | None
    n: int
    half_width: float | None  # of the CONFIDENCE interval: mean +- half_width

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(p, dof))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, std (n-1 dof), n and the half-width ``t_{(1+c)/2, n-1} s / sqrt(n)`` of the
    ``confidence`` interval of the mean (module docstring)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(mean, None, 1, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(mean, std, n, t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n))


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of ``a - b``: mean difference, t statistic, p value (two-sided), pairs."""

    mean_difference: float
    t: float | None
    p: float | None
    pairs: int

    def significant(self, alpha: float = ALPHA) -> bool | None:
        return None if self.p is None else self.p < alpha


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided paired t-test of ``a`` against ``b`` (``a[i]`` and ``b[i]`` from the same
    seed); the module docstring has the formula."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    k = len(d)
    if k == 0:
        raise ValueError("no pairs to test")
    mean = math.fsum(d) / k
    if k < 2:
        return PairedTest(mean, None, None, k)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (k - 1))
    if sd == 0:  # every pair differs by the same amount: no difference at all, or t infinite
        return PairedTest(0.0, None, 1.0, k) if mean == 0 else PairedTest(mean, math.copysign(math.inf, mean), 0.0, k)
    t = mean / (sd / math.sqrt(k))
    return PairedTest(mean, t, float(2 * stats.t.sf(abs(t), k - 1)), k)
