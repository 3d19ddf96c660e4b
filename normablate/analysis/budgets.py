"""One hypothesis at two training budgets: the change of its effect between them, and one Holm family for a document.

A findings document runs every primary hypothesis at two budgets (two independent studies, the second with ~3x the
steps). A reader wants to know whether an effect grows or shrinks with training, so the table gives the change
``d_long − d_short`` with its interval:

* both sides bootstrap distributions (``verdicts.BootDist``, the selection-aware seed bootstrap of an ``at:
  best_lr`` contrast): the two studies' resamples are independent, so a random pairing of their resamples is a
  draw from the distribution of the difference; the interval is its percentile interval, each tail widened by the
  small-sample factor of the study with fewer seeds (as ``BootDist`` does for one study), and never narrower
  than the Welch t interval of the change of the t contrasts at the chosen LRs (``BootDist.floor``);
* both sides t distributions (a fixed configuration): d2 − d1 with se = √(se1² + se2²) and Welch–Satterthwaite
  degrees of freedom;
* otherwise (one side missing its distribution, e.g. a contrast over an axis): the normal approximation from each
  side's interval, labelled as such.

``family`` applies Holm to a whole document's hypotheses at once, with hypotheses whose studies have not finished
counted at p = 1. Holm's adjusted p-values never decrease when another p-value grows, so a word computed this way
can only get stronger when the missing studies finish: "supported" now stays supported (the interim table is
conservative, never optimistic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .verdicts import BootDist, Dist, TDist, Test, t_ppf, widening, words

_N = NormalDist()


@dataclass(frozen=True)
class Change:
    """The change ``d2 − d1`` of a contrast between two budgets, with its two-sided ``level`` interval."""

    estimate: float
    lo: float
    hi: float
    level: float
    method: str


def change(d1: Dist | None, t1: Test, d2: Dist | None, t2: Test, level: float, seed: int = 0) -> Change:
    """The change of one contrast from budget 1 (``d1``, judged as ``t1``) to budget 2 (``d2``/``t2``)."""
    est = t2.estimate - t1.estimate
    if not (math.isfinite(t1.estimate) and math.isfinite(t2.estimate)):
        return Change(math.nan, math.nan, math.nan, level, "a budget has no estimate")
    a = (1.0 - level) / 2.0
    if isinstance(d1, BootDist) and isinstance(d2, BootDist) and d1._ok() and d2._ok():
        rng = np.random.default_rng(seed)
        n = min(len(d1.samples), len(d2.samples))
        s = rng.permutation(d2.samples)[:n] - rng.permutation(d1.samples)[:n]
        med = float(np.median(s))
        k = widening(min(d1.n, d2.n), a)  # (the smaller study's n: the wider of the two)
        lo = med - (med - float(np.quantile(s, a))) * k
        hi = med + (float(np.quantile(s, 1.0 - a)) - med) * k
        how = "difference of the two studies' independent seed bootstraps"
        if d1._floored() and d2._floored():  # as for one study: never narrower than the t at the chosen LRs
            tlo, thi = _t_change(d1.floor, d2.floor, a)
            lo, hi = min(lo, tlo), max(hi, thi)
            how += " (never narrower than the Welch t at the chosen LRs)"
        return Change(est, lo, hi, level, how)
    if isinstance(d1, TDist) and isinstance(d2, TDist) and d1._ok() and d2._ok():
        lo, hi = _t_change(d1, d2, a)
        return Change(est, lo, hi, level, "Welch t on the two budgets' estimates")
    ses = []
    for t in (t1, t2):
        if not (math.isfinite(t.lo) and math.isfinite(t.hi)):
            return Change(est, math.nan, math.nan, level, "a budget has no interval")
        ses.append((t.hi - t.lo) / 2.0 / _N.inv_cdf(0.5 + t.level / 2.0))
    q = _N.inv_cdf(1.0 - a) * math.sqrt(ses[0] ** 2 + ses[1] ** 2)
    return Change(est, est - q, est + q, level, "normal approximation from each budget's interval")


def _t_change(d1: TDist, d2: TDist, a: float) -> tuple[float, float]:
    """The two-sided (1 − 2a) interval of d2 − d1: se = √(se1² + se2²), Welch–Satterthwaite degrees of freedom."""
    est = d2.est - d1.est
    v1, v2 = d1.se ** 2, d2.se ** 2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / ((v1 ** 2 / d1.df if v1 else 0.0) + (v2 ** 2 / d2.df if v2 else 0.0) or math.inf)
    q = t_ppf(1.0 - a, df) if se > 0 and math.isfinite(df) else _N.inv_cdf(1.0 - a)
    return est - q * se, est + q * se


def family(tests: list[Test | None], alpha: float) -> tuple[list[str], list[float], list[float]]:
    """Holm across a document's hypotheses: (words, adjusted claim p, adjusted counter p), one per entry of
    ``tests``; an entry ``None`` (its study not finished) enters at p = 1 and gets the word "pending"."""
    nan = Test(math.nan, math.nan, math.nan, 1.0 - 2.0 * alpha, 1.0, 1.0)
    filled = [t if t is not None else nan for t in tests]
    ws, adj, adjk = words(filled, alpha)
    ws = ["pending" if t is None else w for t, w in zip(tests, ws)]
    return ws, adj, adjk


__all__ = ["Change", "change", "family"]
