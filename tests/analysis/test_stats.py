"""normablate.analysis.stats: the paired interval and the difference of differences (moved out of
scripts/findings_numbers.py), checked against hand computations and against verdicts' exact-t contrasts."""
from __future__ import annotations

import math

import pytest

from normablate.analysis.stats import diff_of_diffs, mean_ci, paired_ci, t_quantile, welch
from normablate.analysis.verdicts import t_contrast


def test_paired_ci_is_the_interval_of_the_per_run_differences_over_finite_pairs():
    a = [1.0, 2.0, 4.0, math.nan, 5.0]
    b = [0.5, 1.0, 3.0, 1.0, None]
    m, ci, n = paired_ci(a, b)
    assert (m, ci, n) == mean_ci([0.5, 1.0, 1.0])  # pairs with a NaN or None on either side are dropped
    assert n == 3 and m == pytest.approx(2.5 / 3)


def test_paired_ci_agrees_with_the_exact_t_contrast():
    a = [0.71, 0.74, 0.69, 0.73, 0.75, 0.70]
    b = [0.70, 0.71, 0.69, 0.70, 0.72, 0.69]
    m, ci, _ = paired_ci(a, b)
    dist = t_contrast(dict(enumerate(a)), dict(enumerate(b)), paired=True)
    lo, hi = dist.interval(0.95)
    assert m == pytest.approx((lo + hi) / 2, rel=1e-12)
    assert ci == pytest.approx((hi - lo) / 2, rel=2e-3)  # mean_ci's t is tabulated to 3 decimals


def test_diff_of_diffs_is_welch_satterthwaite_over_four_groups():
    hi, lo, hi2, lo2 = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0]
    v = [1.6666666666666667 / 4, 1.0 / 3, 4.0 / 3, 2.5 / 5]  # sample variance / n of each group
    dof = sum(v) ** 2 / (v[0] ** 2 / 3 + v[1] ** 2 / 2 + v[2] ** 2 / 2 + v[3] ** 2 / 4)
    d = diff_of_diffs(hi, lo, hi2, lo2)
    assert d.diff == pytest.approx((2.5 - 1.0) - (2.0 - 2.0))
    assert d.df == pytest.approx(dof)
    assert d.ci95 == pytest.approx(t_quantile(0.975, dof) * math.sqrt(sum(v)))
    assert (d.n_a, d.n_b) == (7, 8)
    # with the second difference exactly zero (constant groups), it is Welch's test of hi - lo ... up to df
    w = welch([x - 1.0 for x in hi], [x - 1.0 for x in lo])
    z = diff_of_diffs(hi, lo, [5.0, 5.0], [5.0, 5.0])
    assert z.diff == pytest.approx(w.diff) and z.ci95 == pytest.approx(w.ci95) and z.p == pytest.approx(w.p)


def test_diff_of_diffs_edge_cases():
    few = diff_of_diffs([1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0])
    assert math.isnan(few.ci95) and math.isnan(few.p)
    exact = diff_of_diffs([2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    assert (exact.diff, exact.ci95, exact.p) == (1.0, 0.0, 0.0) and exact.clear
    assert diff_of_diffs([1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]).p == 1.0
