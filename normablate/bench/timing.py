"""Timing and rows: interleaved calls, paired ratios with their bootstrap CI, and ``Row``, one line of
benchmarks.csv.

Every comparison is interleaved (A, B, A, B, ...) and reported as medians and as the median of the per-repeat
ratios, so a loaded machine slows both sides alike; absolute times on a shared machine are noisy, ratios much less.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

FIELDS = ["section", "name", "layout", "variant", "ours", "reference", "ours_value", "reference_value", "unit",
          "ratio", "note"]


@dataclass
class Row:
    section: str
    name: str
    layout: str = ""
    variant: str = "eager"
    ours: str = ""  # what was measured
    reference: str = ""  # what it is compared with
    ours_value: float | None = None
    reference_value: float | None = None
    unit: str = "ms"
    ratio: float | None = None  # ours / reference (time) or reference / ours (throughput): > 1 = ours slower
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        def fmt(v):
            return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        return {k: fmt(getattr(self, k)) for k in FIELDS}

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> Row:
        """A row read back from benchmarks.csv (what ``as_dict`` wrote)."""
        num = {k: (float(d[k]) if d.get(k) else None) for k in ("ours_value", "reference_value", "ratio")}
        return cls(**{k: d.get(k, "") for k in FIELDS if k not in num}, **num)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (A, B, A, B, ...) ``repeats`` times after warm-up."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-repeat ratios a_i / b_i (robust to load that changes between repeats)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True) if y > 0)


def _pair_bootstrap(a: list[float], b: list[float], stat, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap CI of ``stat(a_resampled, b_resampled)`` (arrays of shape (resamples, n)), resampling
    the interleaved repeats as pairs (a repeat's two times share its load) with replacement; a fixed seed, so a bench
    run's CI is reproducible from its times."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    r = stat(x[idx], y[idx])
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def ratio_ci(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% CI of ``paired_ratio(a, b)`` (the median of the per-repeat ratios), by ``_pair_bootstrap``."""
    import numpy as np

    return _pair_bootstrap(a, b, lambda x, y: np.median(x / y, axis=1), resamples, seed)


def median_ratio(a: list[float], b: list[float]) -> float:
    """The ratio of the medians, median(a) / median(b) (claim 7's pre-registered statistic,
    configs/studies/v2/yao_vit_bn.yaml)."""
    return statistics.median(a) / statistics.median(b)


def median_ratio_ci(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% CI of ``median_ratio(a, b)``, by ``_pair_bootstrap``."""
    import numpy as np

    return _pair_bootstrap(a, b, lambda x, y: np.median(x, axis=1) / np.median(y, axis=1), resamples, seed)


def compare(section: str, name: str, layout: str, ours_label: str, ref_label: str, ours: Callable,
            ref: Callable, repeats: int, variant: str = "eager", note: str = "") -> Row:
    """One row: ``ours`` and ``ref`` timed interleaved, milliseconds per call and their paired ratio, with the
    ratio's 95% bootstrap CI over the repeats in the note (``ratio_ci``; from 3 repeats)."""
    t = interleaved({"ours": ours, "ref": ref}, repeats)
    if len(t["ours"]) >= 3:
        note = "; ".join(x for x in (note, "ratio 95%% CI [%.3f, %.3f]" % ratio_ci(t["ours"], t["ref"])) if x)
    return Row(section, name, layout, variant, ours_label, ref_label, statistics.median(t["ours"]) * 1e3,
               statistics.median(t["ref"]) * 1e3, "ms", paired_ratio(t["ours"], t["ref"]), note)
