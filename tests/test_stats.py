"""ftlab.stats against numbers computed by hand and by scipy.stats directly."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sp

from ftlab.stats import paired_t_test, summarize


def test_summary_of_1_2_3_4_by_hand():
    s = summarize([1, 2, 3, 4])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, s^2 = 5/3.
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    # t_{0.975, 3} = 3.182446305284263 (tables: 3.182); half-width t * s / sqrt(4).
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert s.half_width == pytest.approx(half, rel=1e-9)
    assert (s.low, s.high) == pytest.approx((2.5 - half, 2.5 + half))
    assert half == pytest.approx(2.0543, abs=1e-4)  # 3.1824 * 1.2910 / 2


def test_summary_matches_scipy_interval():
    values = [0.4856, 0.4913, 0.4790, 0.5021, 0.4877]
    s = summarize(values)
    low, high = sp.t.interval(0.95, len(values) - 1, loc=sp.tmean(values), scale=sp.sem(values))
    assert (s.low, s.high) == pytest.approx((low, high), rel=1e-12)
    assert s.std == pytest.approx(sp.tstd(values), rel=1e-12)


def test_one_value_has_no_spread_and_none_is_an_error():
    s = summarize([0.7])
    assert (s.mean, s.std, s.n, s.half_width, s.low) == (0.7, None, 1, None, None)
    with pytest.raises(ValueError):
        summarize([])


def test_paired_t_test_by_hand_and_against_scipy():
    a = [0.50, 0.52, 0.47, 0.55]
    b = [0.48, 0.49, 0.46, 0.50]
    # d = 0.02, 0.03, 0.01, 0.05: mean 0.0275, s_d^2 = (0.0075^2 + 0.0025^2 + 0.0175^2 + 0.0225^2)/3
    sd = math.sqrt((0.0075**2 + 0.0025**2 + 0.0175**2 + 0.0225**2) / 3)
    t = 0.0275 / (sd / 2)
    test = paired_t_test(a, b)
    assert test.pairs == 4 and test.mean_difference == pytest.approx(0.0275)
    assert test.t == pytest.approx(t, rel=1e-9)
    assert test.p == pytest.approx(2 * sp.t.sf(t, 3), rel=1e-9)
    ref = sp.ttest_rel(a, b)
    assert (test.t, test.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9)
    assert test.p < 0.05 and test.significant()


def test_a_difference_inside_the_noise_is_not_significant():
    a, b = [0.5, 0.6, 0.4], [0.55, 0.45, 0.5]
    test = paired_t_test(a, b)
    assert test.p == pytest.approx(sp.ttest_rel(a, b).pvalue, rel=1e-9)
    assert test.p > 0.05 and test.significant() is False


def test_degenerate_pairs():
    assert paired_t_test([1.0], [0.5]).p is None  # one pair: no test
    assert paired_t_test([1.0], [0.5]).significant() is None
    same = paired_t_test([0.3, 0.4], [0.3, 0.4])
    assert (same.mean_difference, same.p) == (0.0, 1.0)
    shifted = paired_t_test([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])  # every pair differs by exactly 0.5
    assert shifted.p == 0.0 and shifted.t == math.inf
    with pytest.raises(ValueError):
        paired_t_test([1.0, 2.0], [1.0])
