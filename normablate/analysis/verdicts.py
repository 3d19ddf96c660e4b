"""Verdicts for pre-registered hypotheses: superiority, non-inferiority and equivalence tests of a contrast A − B,
Holm's step-down adjustment, and a selection-aware bootstrap for contrasts taken at each side's best LR.

Pure statistics (numpy and the t distribution of ``stats.py``; no torch, optuna or scipy). The spec side
(``hypotheses:`` in a sweep spec) is ``normablate.sweep.hypotheses``; ``evaluate`` below applies a spec's
hypotheses to a study's trials.

Definitions (the README's "Metric definitions" states the same)
---------------------------------------------------------------
Let d = mean(A) − mean(B) on the reported metric (a ``test/*`` metric) and g the *improvement* of A over B:
g = d when the metric is maximized (accuracy), g = −d when it is minimized (loss, perplexity). Every claim is
directional, so every test is one-sided at level ``alpha`` (α), and the interval shown is the two-sided
(1 − 2α) confidence interval (90% at α = 0.05) that reads the same decision off its ends. (α = 0.025 gives the
regulatory convention: one-sided 2.5%, 95% intervals.) With margin δ ≥ 0:

===============  ========================  ============================  ===================================
type             claim                     supported (claim p ≤ α)       contradicted (counter p ≤ α)
===============  ========================  ============================  ===================================
superiority      g > δ  (δ optional, 0)    CI lower end above δ          CI upper end below δ: A is not
                                                                         better by δ (δ = 0: B is better)
non_inferiority  g > −δ (δ required)       CI lower end above −δ         CI upper end below −δ: A is worse
                                                                         by more than δ
equivalence      −δ < g < δ (δ required)   CI inside (−δ, δ): both one-  the 1 − α CI lies wholly outside
                                           sided tests (TOST) reject     [−δ, δ]: they differ by more than δ
===============  ========================  ============================  ===================================

Otherwise the verdict is *inconclusive* (also when a side has fewer than 2 seeds). The claim p of an
equivalence is the larger of its two one-sided p-values (TOST); its counter p is twice the smaller of the two
"differs by more than δ" p-values (Bonferroni over the two directions, so a false "contradicted" has
probability at most α even when δ is tiny against the noise; hence the 1 − α interval in that row).
With δ = 0 a superiority claim is contradicted only by the opposite effect, and "no difference detected" stays
inconclusive; a δ > 0 (the smallest effect the claim cares about) lets the data contradict "A is meaningfully
better" when the effect is shown to be smaller than δ.

Multiplicity: the claim p-values of a spec's hypotheses are adjusted by Holm's step-down method (family-wise
error ≤ α over the spec's hypotheses, whatever their dependence), the counter p-values likewise as a second
family; the verdict uses the adjusted p-values. The intervals shown are not adjusted.

Contrasts
---------
* at a fixed configuration (``at: {fixed: ...}``) or at each value of an axis (``at: {over: axis}``): Student t.
  Paired (per-seed differences, df = n − 1) when the two sides ran the same seeds (over the seeds both have),
  Welch's unequal-variance t otherwise. ``over``: the claim must hold at every value (intersection–union test:
  claim p = the largest; no adjustment needed), and it is contradicted when it is contradicted at any value
  (counter p = the smallest times the number of values, Bonferroni).
* at each side's best LR (``at: best_lr``): the best LR is chosen on the VALIDATION metric with the rule of the
  ``lr_sensitivity`` study (``best_index``: the best mean over seeds among the LRs at which no seed diverged),
  and the contrast is taken on the TEST metric at the chosen LRs. A t interval around that number would ignore
  that the choice was made from noisy seeds, so the CI comes from a bootstrap over seeds that repeats the choice
  inside every resample (``selection_bootstrap``; paired resampling when the sides share seeds). The interval is
  the percentile interval with each tail's spread about the bootstrap median M widened by a small-sample factor:
  [M − (M − Q(a))·k, M + (Q(1−a) − M)·k], k = √(n/(n−1))·t(1−a, n−1)/z(1−a), with Q the bootstrap
  quantiles and n the seeds (paired) or the smaller side's. For a mean of normal data k turns the percentile interval
  into the t interval: the bootstrap's spread is √((n−1)/n) too small and its tails are normal, not t (the
  same correction as Hesterberg's expanded percentile interval, Hesterberg 2015, "What teachers should know
  about the bootstrap", Sec. 4.5). Keeping each tail's own length keeps the skew and the bimodality that
  re-choosing the best LR creates (e.g. a seed that diverged at the best LR drops out of a third of the
  resamples, moving the choice there), which a t interval around the estimate would flatten into a wide
  symmetric one. Simulated coverage at a nominal 95% (1,000 studies, near-tied LRs; tests/analysis/test_verdicts.py):
  97% at 3, 5 and 10 seeds, where the plain percentile interval gave 79%, 89% and 94%. BCa would need a
  jackknife through the argmax, unstable at these n. p-values invert the same interval (bisection on the
  level). Resampling is deterministic given ``seed``.
  The floor: at 3 seeds a resample mean takes only 10 distinct values, so below a = 1/27 the bootstrap quantile
  sticks at the smallest single-seed value and k cannot recover the t tail; where the LR choice is stable the
  p-values were too small (a nominal 5% test rejected 7% of null studies; tests/analysis/test_verdicts.py).
  The interval is therefore widened to contain the t interval of the same estimate with the chosen LRs taken
  as fixed (``BootDist.floor``: paired t when the sides share the seeds, else Welch), and each p-value is the
  larger of the two (the same interval inverted): the bootstrap carries the uncertainty of the choice, the t
  the small-sample tail (4.5% in the same null studies).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from .. import measures, tasks
from ..labels import value_label as _label
from .stats import t_quantile, t_sf2

DEFINITION = """\
* **Verdicts** (pre-registered hypotheses, the spec's ``hypotheses:``): d = A − B on the reported (test-split)
  metric, g the improvement of A (d for accuracy, −d for loss/perplexity). Each test is one-sided at level
  alpha; the CI shown is the two-sided (1 − 2·alpha) interval. *superiority* (margin δ ≥ 0, default 0): supported
  when the CI's lower end of g is above δ, contradicted when its upper end is below δ. *non_inferiority*
  (δ > 0): supported when g's lower end is above −δ, contradicted when its upper end is below −δ.
  *equivalence* (δ > 0, two one-sided tests): supported when the CI lies inside (−δ, δ), contradicted when the
  (1 − alpha) CI lies wholly outside [−δ, δ]. Otherwise (or with fewer than 2 seeds a side) *inconclusive*.
  The p-values are Holm-adjusted across the spec's hypotheses (claims one family, contradictions another)
  and the words use the adjusted ones. Fixed-configuration contrasts: paired t over shared seeds, else
  Welch; a run stopped as diverged counts there with its test value (the model as it stopped). *At each side's best LR*: the best LR is chosen on the validation metric (the ``lr_sensitivity`` rule:
  best mean among LRs at which no seed diverged), the contrast taken on test there, and the CI is a bootstrap
  over seeds that re-chooses the best LR in every resample (its percentile interval, each tail's spread about
  the bootstrap median widened by √(n/(n−1))·t(n−1)/z, a small-sample correction), never narrower (nor a
  p-value smaller) than the t test's at the chosen LRs. *over an axis*: supported
  only if supported at every value, contradicted if contradicted at any (Bonferroni)."""

TYPES = ("superiority", "non_inferiority", "equivalence")
WORDS = ("supported", "contradicted", "inconclusive")
_N = NormalDist()


# ------------------------------------------------------------------------------------------ distributions
def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (``inf``: the normal)."""
    if math.isinf(df):
        return _N.cdf(t)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = t_sf2(t, df) / 2.0
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The t with P(T <= t) = p, 0 < p < 1."""
    if math.isinf(df):
        return _N.inv_cdf(p)
    if p == 0.5:
        return 0.0
    return t_quantile(p, df) if p > 0.5 else -t_quantile(1.0 - p, df)


class Dist:
    """Inference about a contrast d = A − B: its estimate, one-sided p-values and a two-sided interval."""

    # subclasses (dataclasses) hold: est, method, n_a, n_b, paired

    def p_le(self, c: float) -> float:
        """p-value of H0: d <= c (small when the data say d > c)."""
        raise NotImplementedError

    def p_ge(self, c: float) -> float:
        """p-value of H0: d >= c (small when the data say d < c)."""
        raise NotImplementedError

    def interval(self, level: float) -> tuple[float, float]:
        raise NotImplementedError


@dataclass
class TDist(Dist):
    """est ± t(df)·se (paired or Welch)."""

    est: float
    se: float
    df: float
    method: str
    n_a: int
    n_b: int
    paired: bool = False

    def _ok(self) -> bool:
        return math.isfinite(self.est) and math.isfinite(self.se) and self.df > 0

    def p_le(self, c: float) -> float:
        if not self._ok():
            return math.nan
        if self.se == 0:
            return 0.0 if self.est > c else 1.0
        return 1.0 - t_cdf((self.est - c) / self.se, self.df)

    def p_ge(self, c: float) -> float:
        if not self._ok():
            return math.nan
        if self.se == 0:
            return 0.0 if self.est < c else 1.0
        return t_cdf((self.est - c) / self.se, self.df)

    def interval(self, level: float) -> tuple[float, float]:
        if not self._ok():
            return math.nan, math.nan
        q = t_ppf(0.5 + level / 2.0, self.df) if self.se > 0 else 0.0
        return self.est - q * self.se, self.est + q * self.se


def widening(n: int, a: float) -> float:
    """k(n, a) = √(n/(n−1))·t(1−a, n−1)/z(1−a): the factor by which a bootstrap tail's spread about its median is
    widened at one-sided level a when the resamples are of n seeds (the t's small-sample correction)."""
    return math.sqrt(n / (n - 1)) * t_ppf(1.0 - a, n - 1) / _N.inv_cdf(1.0 - a)


@dataclass
class BootDist(Dist):
    """A bootstrap distribution ``samples`` of the estimate ``est`` from ``n`` seeds: the percentile interval with
    each tail's spread about the bootstrap median widened by k(a) = √(n/(n−1))·t(1−a, n−1)/z(1−a), and the
    p-values that invert it (see the module docstring)."""

    est: float
    samples: np.ndarray
    n: int
    method: str
    n_a: int
    n_b: int
    paired: bool = False
    n_failed: int = 0  # resamples where a side had no candidate LR (left out)
    chosen: tuple = ()  # (A's best LR, B's best LR) on the full sample; None for a side with no candidate
    stability: tuple = ()  # fraction of resamples that chose that same LR, per side
    floor: TDist | None = None  # the t contrast at the chosen LRs: p-values never below its, interval never inside

    def __post_init__(self) -> None:
        s = np.asarray(self.samples, float)
        self.samples = np.sort(s[np.isfinite(s)])
        self.median = float(np.median(self.samples)) if len(self.samples) else math.nan

    def _ok(self) -> bool:
        return math.isfinite(self.est) and self.n >= 2 and len(self.samples) > 1

    def _k(self, a: float) -> float:
        return widening(self.n, a)

    def lower(self, a: float) -> float:
        """The interval's lower end at one-sided level a (increasing in a)."""
        return self.median - (self.median - float(np.quantile(self.samples, a))) * self._k(a)

    def upper(self, a: float) -> float:
        return self.median + (float(np.quantile(self.samples, 1.0 - a)) - self.median) * self._k(a)

    def _invert(self, end, c: float, rising: bool) -> float:
        """The level a at which ``end(a)`` = c (bisection; ``end`` is monotone in a)."""
        lo, hi = 1e-12, _A_MAX
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if (end(mid) > c) == rising:
                hi = mid
            else:
                lo = mid
        return hi

    def _boot_p_le(self, c: float) -> float:
        if self.lower(_A_MAX) > c:  # the lower end passes c at some level below 1/2
            return self._invert(self.lower, c, True)
        if self.upper(_A_MAX) < c:
            return 1.0 - self._boot_p_ge(c)
        return 0.5

    def _boot_p_ge(self, c: float) -> float:
        if self.upper(_A_MAX) < c:
            return self._invert(self.upper, c, False)
        if self.lower(_A_MAX) > c:
            return 1.0 - self._boot_p_le(c)
        return 0.5

    def _floored(self) -> bool:
        return self.floor is not None and self.floor._ok()

    def p_le(self, c: float) -> float:
        if not self._ok():
            return math.nan
        p = self._boot_p_le(c)
        return max(p, self.floor.p_le(c)) if self._floored() else p

    def p_ge(self, c: float) -> float:
        if not self._ok():
            return math.nan
        p = self._boot_p_ge(c)
        return max(p, self.floor.p_ge(c)) if self._floored() else p

    def interval(self, level: float) -> tuple[float, float]:
        """The bootstrap interval, widened where needed to contain the t interval at the chosen LRs (the
        interval the p-values invert: c is inside at level 1 − 2a iff neither p-value is below a)."""
        if not self._ok():
            return math.nan, math.nan
        a = (1.0 - level) / 2.0
        lo, hi = self.lower(a), self.upper(a)
        if self._floored():
            tlo, thi = self.floor.interval(level)
            lo, hi = min(lo, tlo), max(hi, thi)
        return lo, hi


_A_MAX = 0.4999  # (k(a) is 0/0 at a = 1/2)


@dataclass
class Oriented(Dist):
    """``dist`` on the improvement scale g = sign·d (sign −1 for a metric that is minimized)."""

    dist: Dist
    sign: int

    def p_le(self, c: float) -> float:
        return self.dist.p_le(c) if self.sign > 0 else self.dist.p_ge(-c)

    def p_ge(self, c: float) -> float:
        return self.dist.p_ge(c) if self.sign > 0 else self.dist.p_le(-c)

    def interval(self, level: float) -> tuple[float, float]:
        lo, hi = self.dist.interval(level)
        return (lo, hi) if self.sign > 0 else (-hi, -lo)


# ------------------------------------------------------------------------------------------ t contrasts
def _clean(values: Mapping[Any, Any] | Sequence[Any]) -> dict[Any, float]:
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    out = {}
    for k, v in items:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def t_contrast(a: Mapping[Any, float], b: Mapping[Any, float], paired: bool | None = None) -> TDist:
    """mean(a) − mean(b) from {seed: value} mappings (non-finite values dropped). Paired over the seeds both sides
    have when ``paired`` is True, or None and the two sides' seed sets are equal (as in a grid); else Welch."""
    xa, xb = _clean(a), _clean(b)
    common = sorted(set(xa) & set(xb), key=str)
    if paired is None:
        paired = len(common) >= 2 and set(xa) == set(xb)
    if paired:
        d = np.array([xa[s] - xb[s] for s in common])
        n = len(d)
        if n < 2:
            return TDist(float(d.mean()) if n else math.nan, math.nan, math.nan, "paired t", n, n, True)
        return TDist(float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)), n - 1.0, "paired t", n, n, True)
    va, vb = np.array(list(xa.values())), np.array(list(xb.values()))
    na, nb = len(va), len(vb)
    est = float(va.mean() - vb.mean()) if na and nb else math.nan
    if na < 2 or nb < 2:
        return TDist(est, math.nan, math.nan, "Welch t", na, nb)
    sa, sb = va.var(ddof=1) / na, vb.var(ddof=1) / nb
    se2 = sa + sb
    df = se2 ** 2 / (sa ** 2 / (na - 1) + sb ** 2 / (nb - 1)) if se2 > 0 else math.inf
    return TDist(est, math.sqrt(se2), df, "Welch t", na, nb)


# ------------------------------------------------------------------------------------------ best LR
def best_index(means: np.ndarray, candidate: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """The best-LR rule of ``lr_sensitivity``, vectorised over leading dimensions: along the last axis (LRs in
    ascending order), the index with the best mean among the candidates (LRs at which no seed diverged and some
    seed finished); ties go to the first (lowest) LR. Returns (index, none) where ``none`` marks rows with no
    candidate (their index is 0 and means nothing)."""
    means = np.asarray(means, float)
    cand = np.asarray(candidate, bool) & np.isfinite(means)
    if direction == "maximize":
        idx = np.argmax(np.where(cand, means, -np.inf), axis=-1)
    else:
        idx = np.argmin(np.where(cand, means, np.inf), axis=-1)
    return idx, ~cand.any(axis=-1)


def best_lr(runs, metric: str, direction: str, lr: str = "lr", diverged: str = "diverged") -> Any:
    """``best_index`` on a table of runs (a DataFrame, one row per run): per LR (column ``lr``) the mean of
    ``metric`` over its runs; an LR is a candidate when none of its runs diverged (column ``diverged``, where the
    table has one) and some value is finite. Returns the best candidate LR (ties: the lowest), or None. The rule
    of the ``lr_sensitivity`` report, for scripts that join studies (``scripts/findings_numbers.py``)."""
    lrs = sorted(runs[lr].unique())
    at = [runs[runs[lr] == x] for x in lrs]
    means = np.array([g[metric].mean() for g in at], float)
    cand = np.array([not (diverged in g and g[diverged].astype(bool).any()) for g in at], bool)
    i, none = best_index(means, cand, direction) if lrs else (0, True)
    return None if none else lrs[int(i)]


def best_lr_runs(runs, keys: list[str], metric: str, direction: str, lr: str = "lr") -> dict[tuple, Any]:
    """For each variant (a value of every ``keys`` column; missing values included), its runs at its own
    ``best_lr``, in the table's order of variants; a variant without a candidate LR is left out."""
    out = {}
    for variant, g in runs.groupby(keys, dropna=False, sort=False):
        x = best_lr(g, metric, direction, lr)
        if x is not None:
            out[variant if isinstance(variant, tuple) else (variant,)] = g[g[lr] == x]
    return out


@dataclass
class Side:
    """One side of a best-LR contrast: per seed (rows) and LR (columns, ascending) the validation metric, whether
    the run diverged, and the test metric. NaN for a run that did not finish (pruned, missing) or diverged."""

    seeds: list
    lrs: list[float]
    val: np.ndarray  # (n_seeds, n_lrs)
    diverged: np.ndarray  # (n_seeds, n_lrs) bool
    test: np.ndarray  # (n_seeds, n_lrs)

    def aligned(self, seeds: list) -> Side:
        """The same side with rows in the order of ``seeds`` (rows of seeds it lacks: NaN, not diverged)."""
        pos = {s: i for i, s in enumerate(self.seeds)}
        n, L = len(seeds), len(self.lrs)
        val, test, div = np.full((n, L), np.nan), np.full((n, L), np.nan), np.zeros((n, L), bool)
        for i, s in enumerate(seeds):
            if s in pos:
                val[i], test[i], div[i] = self.val[pos[s]], self.test[pos[s]], self.diverged[pos[s]]
        return Side(list(seeds), list(self.lrs), val, div, test)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    ok = np.isfinite(x)
    c = ok.sum(axis=axis)
    s = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def select_and_report(val: np.ndarray, div: np.ndarray, test: np.ndarray, idx: np.ndarray, direction: str):
    """For each resample (rows of ``idx``, seed indices) of a side: the best LR on validation, then the mean test
    metric there. ``val``/``div``/``test``: (..., n, L); ``idx``: (B, n). Returns (test mean (..., B), chosen LR
    index (..., B)); NaN where no LR was a candidate."""
    v = val[..., idx, :]  # (..., B, n, L)
    d = div[..., idx, :].any(axis=-2)  # (..., B, L): a resampled seed diverged there
    t = test[..., idx, :]
    means = _nanmean(v, axis=-2)  # (..., B, L)
    best, none = best_index(means, ~d, direction)
    chosen = np.take_along_axis(t, best[..., None, None], axis=-1)[..., 0]  # (..., B, n)
    out = _nanmean(chosen, axis=-1)
    return np.where(none, np.nan, out), best


def selection_bootstrap(a: Side, b: Side, direction: str, samples: int = 4000, seed: int = 0,
                        paired: bool | None = None) -> BootDist:
    """The selection-aware bootstrap of test(A at A's best LR) − test(B at B's best LR) (module docstring).
    Paired resampling (the same seed draws for both sides) when ``paired`` is True, or None and the sides ran the
    same seeds."""
    if paired is None:
        paired = set(a.seeds) == set(b.seeds) and len(a.seeds) >= 2
    if not (a.seeds and b.seeds and a.lrs and b.lrs):  # a side with no trials yet (a study still running)
        return BootDist(math.nan, np.array([]), 0, "selection-aware bootstrap (a side has no finished trials)",
                        len(a.seeds), len(b.seeds), paired)
    rng = np.random.default_rng(seed)
    if paired:
        seeds = sorted(set(a.seeds) | set(b.seeds), key=str)
        a, b = a.aligned(seeds), b.aligned(seeds)
        n = len(seeds)
        ia = ib = rng.integers(0, n, size=(samples, n))
    else:
        ia = rng.integers(0, len(a.seeds), size=(samples, len(a.seeds)))
        ib = rng.integers(0, len(b.seeds), size=(samples, len(b.seeds)))
    ta, ca = select_and_report(a.val, a.diverged, a.test, np.arange(len(a.seeds))[None], direction)
    tb, cb = select_and_report(b.val, b.diverged, b.test, np.arange(len(b.seeds))[None], direction)
    est = float(ta[0] - tb[0])
    sa, ra = select_and_report(a.val, a.diverged, a.test, ia, direction)
    sb, rb = select_and_report(b.val, b.diverged, b.test, ib, direction)
    diff = sa - sb
    chosen = tuple(side.lrs[int(c[0])] if math.isfinite(t[0]) else None for side, c, t in ((a, ca, ta), (b, cb, tb)))
    stability = (float(np.mean(ra == ca[0])), float(np.mean(rb == cb[0])))
    n_eff = len(a.seeds) if paired else min(len(a.seeds), len(b.seeds))
    how = "paired" if paired else "independent"
    floor = None
    if all(x is not None for x in chosen):  # the t contrast of the same estimate, the LRs taken as fixed
        at = [dict(zip(side.seeds, side.test[:, int(c[0])])) for side, c in ((a, ca), (b, cb))]
        floor = t_contrast(at[0], at[1], None if paired else False)
    return BootDist(est, diff, n_eff, f"selection-aware bootstrap ({samples} {how} seed resamples, best LR "
                                      f"re-chosen on val in each; never narrower than the "
                                      f"{floor.method if floor else 't'} at the chosen LRs)",
                    len(a.seeds), len(b.seeds), paired,
                    n_failed=int((~np.isfinite(diff)).sum()), chosen=chosen, stability=stability, floor=floor)


# ------------------------------------------------------------------------------------------ tests and Holm
@dataclass
class Test:
    """One hypothesis's test before multiplicity adjustment (estimate and interval on the A − B scale)."""

    estimate: float
    lo: float
    hi: float
    level: float  # of the interval
    p: float  # claim p-value (small: the claim is supported)
    p_counter: float  # counter p-value (small: the claim is contradicted)
    method: str = ""
    n_a: int = 0
    n_b: int = 0
    paired: bool = False


def judge(dist: Dist, kind: str, margin: float | None, alpha: float, direction: str) -> Test:
    """The claim and counter p-values of a ``kind`` test (module docstring) on ``dist`` (of d = A − B) for a
    metric that is maximized or minimized, and the (1 − 2α) interval of d."""
    if kind not in TYPES:
        raise ValueError(f"unknown hypothesis type {kind!r}; valid: {', '.join(TYPES)}")
    g = Oriented(dist, 1 if direction == "maximize" else -1)
    m = float(margin or 0.0)
    if kind == "superiority":
        p, pk = g.p_le(m), g.p_ge(m)
    elif kind == "non_inferiority":
        p, pk = g.p_le(-m), g.p_ge(-m)
    else:
        p = max(g.p_le(-m), g.p_ge(m))
        pk = min(1.0, 2.0 * min(g.p_le(m), g.p_ge(-m)))
    lo, hi = dist.interval(1.0 - 2.0 * alpha)
    return Test(dist.est, lo, hi, 1.0 - 2.0 * alpha, p, pk, dist.method, dist.n_a, dist.n_b, dist.paired)


def combine_over(tests: list[Test]) -> Test:
    """A claim that must hold at every value of an axis: intersection–union (claim p = the largest), contradicted
    at any value (counter p = Bonferroni over the values). The estimate and interval are the least favourable
    value's (the one with the largest claim p)."""
    ps = [t.p if math.isfinite(t.p) else 1.0 for t in tests]
    worst = tests[int(np.argmax(ps))]
    pk = [t.p_counter for t in tests if math.isfinite(t.p_counter)]
    p = math.nan if any(not math.isfinite(t.p) for t in tests) else max(ps)
    return Test(worst.estimate, worst.lo, worst.hi, worst.level, p,
                min(1.0, len(tests) * min(pk)) if pk else math.nan, worst.method, worst.n_a, worst.n_b, worst.paired)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (monotone in the sorted order, capped at 1; NaN counts as 1)."""
    p = [1.0 if v is None or not math.isfinite(v) else float(v) for v in pvalues]
    m = len(p)
    adj = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def holm_pairs(pairs: Sequence[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """Holm across a document's primary hypotheses: ``[(hypothesis, p), ...]`` -> ``[(hypothesis, p, adjusted p),
    ...]`` in the same order (e.g. the p of every primary hypothesis of docs/findings.md, one family)."""
    names = [h for h, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"holm_pairs: a hypothesis is listed twice: {sorted(h for h in set(names) if names.count(h) > 1)}")
    ps = [p for _, p in pairs]
    return list(zip(names, ps, holm(ps)))


def words(tests: Sequence[Test], alpha: float) -> tuple[list[str], list[float], list[float]]:
    """Verdict words after Holm (claims and counters, each a family): (words, adjusted p, adjusted counter p)."""
    adj, adjk = holm([t.p for t in tests]), holm([t.p_counter for t in tests])
    out = []
    for t, a, k in zip(tests, adj, adjk):
        if not math.isfinite(t.p):
            out.append("inconclusive")
        elif a <= alpha:
            out.append("supported")
        elif k <= alpha:
            out.append("contradicted")
        else:
            out.append("inconclusive")
    return out, adj, adjk


# ------------------------------------------------------------------------------------------ on a study
@dataclass
class Verdict:
    """One hypothesis of a study, judged."""

    id: str
    claim: str
    type: str
    margin: float | None
    alpha: float
    what: str  # "test/acc at each side's best LR (chosen on val/acc)"
    split: str  # "test" | "val" (old trials without test metrics)
    test: Test
    p_adj: float = math.nan
    p_counter_adj: float = math.nan
    word: str = "inconclusive"
    details: list[dict[str, Any]] = field(default_factory=list)  # over: one row per axis value
    notes: list[str] = field(default_factory=list)
    direction: str = "maximize"  # of the metric
    dist: Any = None  # the Dist the test was read from (None for an ``over`` contrast, combined over its values)
    interim: str = ""  # "12/54": the study had not finished (the word is not the pre-registered verdict)

    def type_label(self) -> str:
        return self.type.replace("_", "-") + (f", δ = {self.margin:g}" if self.margin else "")

    def line(self) -> str:
        """The one-line verdict (printed last by ``normablate sweep``)."""
        t = self.test
        ci = (f"{t.level:.0%} CI [{t.lo:+.3g}, {t.hi:+.3g}]" if math.isfinite(t.lo) else "no CI (too few seeds)")
        word = self.word.upper() + (f" (INTERIM: {self.interim} runs)" if self.interim else "")
        return (f"verdict {self.id}: {word} ({self.type_label()}, alpha {self.alpha:g}): "
                f"A − B = {t.estimate:+.3g} on {self.split} data, {ci}, {self.p_text()} — {self.what}")

    def seeds_needed(self) -> str:
        """For an inconclusive verdict: roughly how many times the seeds would decide it, if the estimate were the
        truth (the interval shrinks as 1/√n; Holm and the bootstrap's small-sample factor ignored)."""
        t = self.test
        if self.word != "inconclusive" or not (math.isfinite(t.lo) and math.isfinite(t.hi)):
            return ""
        sign = 1.0 if self.direction == "maximize" else -1.0
        g, m = sign * t.estimate, float(self.margin or 0.0)
        bound = {"superiority": m, "non_inferiority": -m}.get(self.type, math.copysign(m, g))
        if self.type == "equivalence" and abs(g) > m:  # outside the margin: more seeds would contradict it, read
            # off the (1 - alpha) interval, wider than the (1 - 2 alpha) one shown by about this factor squared
            z = NormalDist().inv_cdf
            factor = ((t.hi - t.lo) / 2.0 / (abs(g) - m)) ** 2 * (z(1 - self.alpha / 2) / z(1 - self.alpha)) ** 2
            return (f"the estimate lies outside the equivalence margin (±{m:g}): if it were the truth, about "
                    f"{max(factor, 1.0):.1f}x the seeds would contradict the claim")
        gap = abs(g - bound) if self.type != "equivalence" else m - abs(g)
        if gap <= 0:
            return f"untestable at this budget as estimated: the estimate sits on the claim's boundary ({bound:+.3g})"
        factor = ((t.hi - t.lo) / 2.0 / gap) ** 2
        if factor <= 1.0:
            return "the unadjusted interval decides it; Holm's adjustment across the hypotheses keeps it open"
        return (f"at this budget the {t.level:.0%} CI's half-width is {(t.hi - t.lo) / 2:.3g}; if the estimate were "
                f"the truth, about {factor:.1f}x the seeds would decide it")

    def p_text(self) -> str:
        """The Holm-adjusted p the word rests on (for a contradiction: the test against the claim's)."""
        if self.word == "contradicted":
            return f"Holm-adjusted p = {self.p_adj:.3g} (against the claim: {self.p_counter_adj:.3g})"
        return f"Holm-adjusted p = {self.p_adj:.3g}"


def _match(df, names: dict[str, str], values: dict[str, Any]):
    """Rows of ``df`` whose axis columns hold ``values`` (dotted key -> raw value; ``names``: key -> column)."""
    m = np.ones(len(df), bool)
    for key, v in values.items():
        colv = df[names[key]].map(_label).to_numpy()
        m &= colv == _label(v)
    return df[m]


def _columns(data, metric: str) -> tuple[str, str, str]:
    """(test column, validation column used for selection, split actually reported). For a run measure
    (``normablate.measures``) the selection column is the study metric's (an LR is chosen for what the study
    optimizes, not for its gap or its landscape) and a probe measure's column is ``mean_probe_...``, filled in
    ``data.trials`` from the runs' probe summaries (split "train": probes measure at the training batches)."""
    from .data import col

    at = data.spec.metric_at
    m = measures.get(metric)
    if m is not None:
        vcol = col(data.spec.metric, at)
        if m.source == "probes":
            return col(metric, "mean"), vcol, "train"
        return col(metric, at), vcol, "test"
    val_metric = "val/" + metric.split("/", 1)[1]
    vcol, tcol = col(val_metric, at), col(metric, at)
    df = data.trials
    if tcol in df and df[tcol].notna().any():
        return tcol, vcol, "test"
    return vcol, vcol, "val"


def _with_probe_columns(data, metrics: list[str]):
    """``data.trials`` with a ``mean_probe_...`` column for each probe measure among ``metrics`` (each run's value
    from its probe summary, ``measures.probe_value``; NaN for a run without it)."""
    from .data import col

    df = data.trials
    for metric in dict.fromkeys(metrics):
        m = measures.get(metric)
        if m is None or m.source != "probes" or not len(df):
            continue
        values = [measures.probe_value(metric, data.probe_means.get(i) or {}) for i in range(len(df))]
        df = df.assign(**{col(metric, "mean"): [np.nan if v is None else v for v in values]})
    return df


def _pretty(column: str) -> str:
    """``final_val_acc`` -> ``final val/acc``."""
    at, _, rest = column.partition("_")
    return f"{at} {rest.replace('_', '/', 1)}"


def _seed_col(df) -> Any:
    return df["seed"] if "seed" in df else np.zeros(len(df), int)


def _per_seed(rows, column: str, with_diverged: bool = False) -> tuple[dict, int, set]:
    """{seed: value} of the runs a fixed-configuration contrast counts, the number of diverged runs left out, and
    every seed that ran. ``with_diverged`` (test-split metrics): a run stopped as diverged counts with its test
    value, which is the model as it stopped (``train`` tests diverged runs): at a fixed configuration, failing to
    train is the outcome measured, and leaving such runs out would judge only the survivors. Only a diverged run
    without a finite value (a non-finite loss) is left out. Without it (validation columns of runs from before
    the test split, whose last value predates the divergence) diverged runs are left out, as every mean does."""
    from .data import ok_rows

    ended = rows[rows["state"] == "complete"] if with_diverged else ok_rows(rows)
    vals = {}
    if column in ended:
        for seed, v in zip(_seed_col(ended).tolist(), ended[column].tolist()):
            if v is not None and np.isfinite(v):
                vals[seed] = float(v)
    div = rows["diverged"].astype(bool)
    kept = set(vals)
    left_out = int(sum(1 for seed, d in zip(_seed_col(rows).tolist(), div.tolist()) if d and seed not in kept))
    return vals, left_out, set(_seed_col(rows).tolist())


def _n_diverged_counted(rows, vals: dict) -> int:
    div = rows["diverged"].astype(bool).tolist()
    return sum(1 for seed, d in zip(_seed_col(rows).tolist(), div) if d and seed in vals)


def _side(rows, vcol: str, tcol: str, lr_col: str = "lr") -> Side:
    seeds = sorted(set(_seed_col(rows).tolist()), key=str)
    lrs = sorted({float(x) for x in rows[lr_col]})
    n, L = len(seeds), len(lrs)
    val, test, div = np.full((n, L), np.nan), np.full((n, L), np.nan), np.zeros((n, L), bool)
    si, li = {s: i for i, s in enumerate(seeds)}, {x: j for j, x in enumerate(lrs)}
    for s, r in zip(_seed_col(rows).tolist(), rows.to_dict("records")):
        i, j = si[s], li[float(r[lr_col])]
        if bool(r["diverged"]):
            div[i, j] = True
        elif r["state"] == "complete":
            val[i, j] = r.get(vcol, np.nan) if r.get(vcol) is not None else np.nan
            test[i, j] = r.get(tcol, np.nan) if r.get(tcol) is not None else np.nan
    return Side(seeds, lrs, val, div, test)


def evaluate(data, hypotheses: list[dict[str, Any]] | None = None, samples: int = 4000) -> list[Verdict]:
    """Judge a study's pre-registered hypotheses (``data.spec.hypotheses``, as ``sweep.hypotheses.check`` normalized
    them) on its trials; Holm across them. Deterministic (the bootstrap of the i-th hypothesis uses seed i)."""
    spec = data.spec
    hyps = hypotheses if hypotheses is not None else list(getattr(spec, "hypotheses", None) or [])
    if not hyps:
        return []
    names = {a.key: a.name for a in spec.axes}
    from .tables import study_task  # (pandas: only when judging)

    task = study_task(data) or tasks.get(spec.task)  # the trials' task, else the spec's base config's
    df = _with_probe_columns(data, [h["contrast"]["metric"] for h in hyps])
    out: list[Verdict] = []
    for k, h in enumerate(hyps):
        c = h["contrast"]
        metric = c["metric"]
        measure = measures.get(metric)
        direction = measure.direction if measure else task.direction(metric)
        select_direction = task.direction(spec.metric) if measure else direction  # the best LR's choice
        tcol, vcol, split = _columns(data, metric)
        at = c["at"]
        notes = [] if split != "val" else [f"the trials have no {metric}: the verdict uses {_pretty(vcol)} "
                                           f"(runs from before the test split)"]
        if split == "train":
            notes.append(f"{metric} is the mean over each run's probed steps, measured at its training batches; "
                         f"runs stopped as diverged are left out (their probes cover only the steps before)")
        if len(df) and (tcol not in df or not df[tcol].notna().any()):
            notes.append(f"no run recorded {metric} (were its instrument's config keys on? normablate.measures)")
        details: list[dict[str, Any]] = []
        vdist: Dist | None = None
        if not len(df):
            test = Test(math.nan, math.nan, math.nan, 1 - 2 * h["alpha"], math.nan, math.nan, "no finished trials")
            what = f"{metric}: no finished trials"
        elif at == "best_lr":
            ra, rb = _match(df, names, c["a"]), _match(df, names, c["b"])
            lr_col = names.get("optim.lr", "lr")
            sa, sb = _side(ra, vcol, tcol, lr_col), _side(rb, vcol, tcol, lr_col)
            dist = vdist = selection_bootstrap(sa, sb, select_direction, samples, seed=k)
            test = judge(dist, h["type"], h.get("margin"), h["alpha"], direction)
            lrs = ", ".join(f"{s} {x:g}" if x is not None else f"{s} none" for s, x in zip("AB", dist.chosen))
            what = f"{_pretty(tcol)} at each side's best LR ({lrs}; chosen on {_pretty(vcol)})"
            for s, x, grid, st in zip("AB", dist.chosen, (sa.lrs, sb.lrs), dist.stability):
                if x is not None and len(grid) > 1 and x in (grid[0], grid[-1]):
                    notes.append(f"{s}'s best LR {x:g} is the grid's {'lowest' if x == grid[0] else 'highest'}: its "
                                 f"optimum may lie outside the grid")
                if x is not None and st < 0.8:
                    notes.append(f"{s}'s best LR {x:g} is chosen in only {st:.0%} of the seed resamples")
            if dist.n_failed:
                notes.append(f"{dist.n_failed} of {samples} resamples left out: a side had no LR without a "
                             f"diverged seed")
        else:
            fixed = dict(at.get("fixed") or {})
            over = at.get("over")
            values = [None] if over is None else [a.values for a in spec.axes if a.key == over][0]
            tests = []
            for v in values:
                where = dict(fixed, **({over: v} if over else {}))
                va, na, sa = _per_seed(_match(df, names, {**c["a"], **where}), tcol, split == "test")
                vb, nb, sb = _per_seed(_match(df, names, {**c["b"], **where}), tcol, split == "test")
                paired = sa == sb and len(sa) >= 2  # the same seeds ran (a diverged one drops from its pair)
                dist_fixed = t_contrast(va, vb, paired)
                t = judge(dist_fixed, h["type"], h.get("margin"), h["alpha"], direction)
                tests.append(t)
                at_v = f"at {names[over]}={_label(v)}: " if over else ""
                if na or nb:
                    notes.append(f"{at_v}diverged runs left out (A {na}, B {nb})")
                ca, cb = (_n_diverged_counted(_match(df, names, {**side, **where}), vals)
                          for side, vals in ((c["a"], va), (c["b"], vb)))
                if ca or cb:
                    notes.append(f"{at_v}diverged runs counted with their test values, the model as it stopped "
                                 f"(A {ca}, B {cb})")
                if over:
                    details.append({names[over]: _label(v), "estimate": t.estimate, "lo": t.lo, "hi": t.hi,
                                    "p": t.p, "n": f"{t.n_a} vs {t.n_b}"})
            test = tests[0] if over is None else combine_over(tests)
            vdist = dist_fixed if over is None else None
            where_s = ", ".join(f"{names.get(kk, kk)}={_label(x)}" for kk, x in fixed.items())
            what = (_pretty(tcol) + (f" at {where_s}" if where_s else "")
                    + (f" at every {names[over]} (least favourable shown)" if over else ""))
        side = lambda s: ", ".join(f"{names.get(kk, kk)}={_label(x)}" for kk, x in s.items())  # noqa: E731
        what = f"A = {side(c['a'])} vs B = {side(c['b'])}: {what}; {test.method}"
        out.append(Verdict(h["id"], h["claim"], h["type"], h.get("margin"), h["alpha"], what, split, test,
                           details=details, notes=notes, direction=direction,
                           dist=vdist))
    alpha = out[0].alpha
    ws, adj, adjk = words([v.test for v in out], alpha)
    done, total = len(data.trials), int(getattr(data, "total", 0) or 0)
    for v, w, a, kk in zip(out, ws, adj, adjk):
        v.word, v.p_adj, v.p_counter_adj = w, a, kk
        if done < total:  # read before the study finished: not the pre-registered verdict (optional stopping)
            v.interim = f"{done}/{total}"
            v.notes.insert(0, f"interim: {done} of the study's {total} runs had finished; the pre-registered "
                              f"verdict is the one read when all have")
        need = v.seeds_needed()
        if need:
            v.notes.append(need)
    return out


# ------------------------------------------------------------------------------------------ report
def rows(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    """One row per hypothesis (``verdicts.csv``; the columns of the table summary.md opens with)."""
    out = []
    for v in verdicts:
        t = v.test
        out.append({"id": v.id, "claim": v.claim, "type": v.type, "margin": v.margin, "alpha": v.alpha,
                    "split": v.split, "estimate": t.estimate, "ci_lo": t.lo, "ci_hi": t.hi, "ci_level": t.level,
                    "p": t.p, "p_holm": v.p_adj, "p_counter": t.p_counter, "p_counter_holm": v.p_counter_adj,
                    "verdict": v.word, "n_a": t.n_a, "n_b": t.n_b, "method": t.method, "contrast": v.what,
                    "notes": "; ".join(v.notes), "line": v.line()})
    return out


def _fmt(x: float) -> str:
    return f"{x:+.3g}" if x is not None and math.isfinite(x) else "–"


def markdown(verdicts: list[Verdict]) -> str:
    """The verdict section summary.md opens with (empty string: no hypotheses)."""
    if not verdicts:
        return ""
    alpha = verdicts[0].alpha
    head = ("| id | claim | type | A − B (split) with CI | Holm-adjusted p | verdict |\n"
            "|---|---|---|---|---|---|\n")
    body = []
    for v in verdicts:
        t = v.test
        ci = (f"[{_fmt(t.lo)}, {_fmt(t.hi)}] ({t.level:.0%})" if math.isfinite(t.lo) else "no CI (< 2 seeds)")
        body.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", " ") for x in (
            v.id, v.claim, v.type_label(), f"{_fmt(t.estimate)} ({v.split}) {ci}, n = {t.n_a} vs {t.n_b}",
            v.p_text().replace("Holm-adjusted p = ", ""),
            f"**{v.word}**" + (f" (interim, {v.interim} runs)" if v.interim else ""))) + " |")
    lines = [f"## Verdicts (pre-registered hypotheses; Holm across {len(verdicts)}, alpha {alpha:g})", "",
             head + "\n".join(body), ""]
    for v in verdicts:
        lines.append(f"- **{v.id}**: {v.what}." + (f" Note: {'; '.join(v.notes)}." if v.notes else ""))
        if v.details:
            key = [k for k in v.details[0] if k not in ("estimate", "lo", "hi", "p", "n")][0]
            lines.append("  " + "; ".join(f"{key}={d[key]}: {_fmt(d['estimate'])} [{_fmt(d['lo'])}, {_fmt(d['hi'])}]"
                                          f", p={d['p']:.3g}, n={d['n']}" for d in v.details) + ".")
    if any(v.split == "val" for v in verdicts):
        lines.append("- **These trials recorded no test-split metrics** (runs from before normablate evaluated a "
                     "test split): the verdicts above use the validation split, on which the best LR was also "
                     "chosen, so they carry the selection bias a test split removes.")
    lines += ["", "How to read it: A − B is in the metric's units; the CI is the two-sided (1 − 2·alpha) interval "
              "that the one-sided tests read off; supported / contradicted / inconclusive are defined in \"How the "
              "numbers are defined\" below. Everything after this section is **exploratory**: comparisons not "
              "stated before the study ran, with no correction for how many there are.", ""]
    return "\n".join(lines)
