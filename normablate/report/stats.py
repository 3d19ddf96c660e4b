"""Mean and 95% confidence interval over seeds, with Student's t quantiles from a table.

scipy is not a dependency of anything we install (torch, Lightning, Optuna, pandas, matplotlib do not pull it
in), and adding a ~40 MB package for one quantile function is poor value. ``T975`` holds the two-sided 95%
quantiles t(0.975, df) for df = 1..30 (standard tables, 3 decimals); beyond 30 we use the entry for the largest
tabulated df not above it (40, 60, 120), which slightly widens the interval (conservative), and 1.960 (the
normal quantile) from df = 1000 on.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

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


def mean_ci(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% CI, n) over the finite values. The CI is t(0.975, n-1) * s / sqrt(n) with s
    the sample standard deviation; NaN when n < 2 (one seed says nothing about the spread)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
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
