"""Statistics over seeds: mean and 95% confidence interval, and Welch's test of a difference between two means.

scipy is not a dependency of anything we install (torch, Lightning, Optuna, pandas, matplotlib do not pull it
in), and adding a ~40 MB package for a few distribution functions is poor value. So:

* ``T975`` holds the two-sided 95% quantiles t(0.975, df) for df = 1..30 (standard tables, 3 decimals) and a
  few larger df; ``t975`` uses the entry for the largest tabulated df not above it (conservative) and 1.960
  from df = 1000 on. ``mean_ci`` uses it (the numbers in existing reports stay exactly as they were).
* Student's t CDF comes from the regularized incomplete beta function, I_x(a, b), evaluated with Lentz's
  continued fraction (Numerical Recipes, Sec. 6.4); the quantile for a non-integer df (Welch) by bisection on
  the CDF. Tested against tabulated values.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
    40: 2.021, 60: 2.000, 120: 1.980, 1000: 1.962,
}


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        return math.nan
    if df in T975:
        return T975[df]
    if df > 1000:
        return 1.960
    return T975[max(k for k in T975 if k <= df)]


def finite(values: Iterable[float | None]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def mean_ci(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% CI, n) over the finite values. The CI is t(0.975, n-1) * s / sqrt(n) with s
    the sample standard deviation; NaN when n < 2 (one seed says nothing about the spread)."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, 1
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t975(n - 1) * s / math.sqrt(n), n


def fmt_ci(mean: float, ci: float, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    if ci is None or not math.isfinite(ci):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {ci:.2g}"


# ---------------------------------------------------------------------------------------- Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|) for Student's t with ``df`` (may be non-integer) degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0.5 < p < 1), any df > 0, by bisection on the CDF."""
    target = 2.0 * (1.0 - p)  # two-sided tail mass
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class Difference:
    """Welch's comparison of two means: a - b, its 95% CI, the Welch-Satterthwaite df and the two-sided p."""

    diff: float
    ci95: float  # half-width
    df: float
    p: float
    n_a: int
    n_b: int

    @property
    def lo(self) -> float:
        return self.diff - self.ci95

    @property
    def hi(self) -> float:
        return self.diff + self.ci95

    @property
    def clear(self) -> bool:
        """The 95% CI of the difference excludes 0 (equivalently p < 0.05)."""
        return math.isfinite(self.ci95) and (self.lo > 0 or self.hi < 0)


def welch(a: Iterable[float | None], b: Iterable[float | None]) -> Difference:
    """Welch's unequal-variance t-test of mean(a) - mean(b) over the finite values. NaN CI/p when either side
    has fewer than 2 values, or both have zero variance and different means (then p = 0, CI = 0)."""
    xa, xb = finite(a), finite(b)
    na, nb = len(xa), len(xb)
    if na == 0 or nb == 0:
        return Difference(math.nan, math.nan, math.nan, math.nan, na, nb)
    ma, mb = sum(xa) / na, sum(xb) / nb
    if na < 2 or nb < 2:
        return Difference(ma - mb, math.nan, math.nan, math.nan, na, nb)
    va = sum((x - ma) ** 2 for x in xa) / (na - 1)
    vb = sum((x - mb) ** 2 for x in xb) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 == 0:
        return Difference(ma - mb, 0.0, math.inf, 1.0 if ma == mb else 0.0, na, nb)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    se = math.sqrt(se2)
    return Difference(ma - mb, t_quantile(0.975, df) * se, df, t_sf2((ma - mb) / se, df), na, nb)


def paired_ci(a: Iterable[float | None], b: Iterable[float | None]) -> tuple[float, float, int]:
    """Two measurements of the same runs (``a[i]`` and ``b[i]`` from run i): ``mean_ci`` of the per-run differences
    a - b over the pairs where both are finite."""
    return mean_ci([x - y for x, y in zip(a, b) if len(finite([x, y])) == 2])


def diff_of_diffs(hi: Iterable[float | None], lo: Iterable[float | None], hi2: Iterable[float | None],
                  lo2: Iterable[float | None]) -> Difference:
    """(mean(hi) - mean(lo)) - (mean(hi2) - mean(lo2)) of four independent groups of runs (e.g. BN's accuracy drop
    from the large to the small batch minus GN's), with its Welch-Satterthwaite 95% CI and two-sided p. NaN CI and p
    when a group has fewer than 2 finite values; ``n_a``, ``n_b``: the runs of the first and of the second
    difference."""
    groups = [finite(g) for g in (hi, lo, hi2, lo2)]
    n_a, n_b = len(groups[0]) + len(groups[1]), len(groups[2]) + len(groups[3])
    if min(len(g) for g in groups) < 2:
        return Difference(math.nan, math.nan, math.nan, math.nan, n_a, n_b)
    means = [sum(g) / len(g) for g in groups]
    v = [sum((x - m) ** 2 for x in g) / (len(g) - 1) / len(g) for g, m in zip(groups, means)]
    d = (means[0] - means[1]) - (means[2] - means[3])
    se = math.sqrt(sum(v))
    if se == 0:  # every group constant: the difference is exact
        return Difference(d, 0.0, math.inf, 1.0 if d == 0 else 0.0, n_a, n_b)
    dof = sum(v) ** 2 / sum(vi ** 2 / (len(g) - 1) for vi, g in zip(v, groups))
    return Difference(d, t_quantile(0.975, dof) * se, dof, t_sf2(abs(d) / se, dof), n_a, n_b)
