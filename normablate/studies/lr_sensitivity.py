"""``lr_sensitivity``: the study metric against the learning rate, per norm; best LR and usable-range width."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import tasks
from ..errors import ConfigError
from . import register
from .base import Comparison, Section, SpecContext, StudyKind

DEFAULT_TOLERANCE = {"val/acc": 0.05}  # by the task's primary metric: 5 accuracy points; any other (LMs) 0.1


@register("lr_sensitivity")
class LRSensitivity(StudyKind):
    keys = ("tolerance", "tolerance_relative")
    definition = """\
* ``lr_sensitivity``: v(lr) is the mean over non-diverged seeds of the study metric (validation split) at a grid
  LR, m(lr) the same mean of its test-split counterpart (trials from before the test split: m = v). The best LR
  l* is the LR with the best v among the LRs at which no seed diverged (selection uses validation only); the
  tables state m. The usable-range rule is the spec's: an LR is *usable* when no seed diverged at it and m(lr)
  is within ``tolerance`` of m(l*) (an absolute threshold in the metric's units: at least m(l*) - tol when
  maximizing, at most m(l*) + tol when minimizing; or a fraction of the best, tol * |m(l*)|, with
  ``tolerance_relative: true``; default 0.05 absolute for accuracy, 0.1 for LMs). The usable range [lo, hi] is
  the longest run of consecutive grid LRs that contains l* and is usable throughout; its width is
  log10(hi / lo) decades: 0 when only l* is usable, a lower bound set by the grid's spacing. Widths are
  compared with the widest configuration's (ratio and difference) with a 95% percentile interval from 2,000
  paired seed resamples that re-derive l* and the range in each (exploratory)."""

    def check(self, raw: dict[str, Any], ctx: SpecContext) -> dict[str, Any]:
        ctx.need_axis(self.name, "optim.lr", "optim.lr: {logspace: [0.001, 1.0, 7]}")
        tol = raw.get("tolerance", DEFAULT_TOLERANCE.get(tasks.get(ctx.task).primary, 0.1))
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
            raise ConfigError(f"{ctx.where}: tolerance={tol!r} must be a number >= 0")
        rel = raw.get("tolerance_relative", False)
        if not isinstance(rel, bool):
            raise ConfigError(f"{ctx.where}: tolerance_relative must be true or false")
        return {"tolerance": float(tol), "tolerance_relative": rel}

    # ------------------------------------------------------------------ report
    def table(self, data):
        """Per norm (and any other non-LR axis): best LR (chosen on the study metric, validation), the reported
        metric (test split where the trials have it) at each LR, diverged LRs, usable-range width."""
        import numpy as np
        import pandas as pd

        from ..analysis.data import groups, ok_rows
        from ..analysis.tables import cell
        from ..analysis.verdicts import best_index

        spec, df = data.spec, data.trials
        sel, rep = data.metric_col, data.report_col
        cols = [c for c in data.group_cols if c != "lr"]
        out = []
        for key, sub in groups(df, cols):
            row: dict[str, Any] = dict(zip(cols, key))
            per_lr = []
            for lr, s in sorted(sub.groupby("lr"), key=lambda kv: float(kv[0])):
                m, ci, n, nd, text = cell(s, rep)
                sel_mean = cell(s, sel)[0]
                ok = ok_rows(s)
                per_lr.append({"lr": float(lr), "mean": m, "ci95": ci, "n": len(s), "n_ok": n, "n_diverged": nd,
                               "text": text, "values": ok[rep].tolist() if rep in ok else [], "sel_mean": sel_mean})
            means = np.array([p["sel_mean"] for p in per_lr], float)
            cand = np.array([p["n_diverged"] == 0 and p["n_ok"] > 0 for p in per_lr], bool)
            i, none = best_index(means, cand, spec.direction) if per_lr else (0, True)
            best = None if none or not math.isfinite(per_lr[int(i)]["mean"]) else per_lr[int(i)]
            lo, hi = usable_range(per_lr, best, spec.options, spec.direction)
            row.update(
                best_lr=best["lr"] if best else None,
                best_mean=best["mean"] if best else None, best_ci95=best["ci95"] if best else None,
                usable_lr_min=lo, usable_lr_max=hi,
                width_decades=math.log10(hi / lo) if lo else None,
                diverged_lrs=" ".join(f"{p['lr']:g}({p['n_diverged']}/{p['n']})" for p in per_lr if p["n_diverged"]),
            )
            for p in per_lr:
                row[f"lr={p['lr']:g}"] = p["text"]
            row["_per_lr"] = per_lr
            row["_best_values"] = best["values"] if best else []
            out.append(row)
        return pd.DataFrame(out)

    def comparison(self, data, summ) -> Comparison:
        from ..analysis.tables import config_label

        lr = self.table(data)
        cols = [c for c in data.group_cols if c != "lr"]
        values = {config_label([r[c] for c in cols], cols): list(r["_best_values"]) for _, r in lr.iterrows()}
        spec = data.spec
        what = f"{reported(data)} at its best LR (chosen on {spec.metric_at} {spec.metric})"
        return Comparison(what, values, spec.direction)

    def section(self, data, summ, out: Path) -> Section:
        from ..analysis.tables import conclusion, markdown_table

        spec = data.spec
        lr = self.table(data)
        tol = spec.options["tolerance"]
        tol_s = f"{tol:g} x |best|" if spec.options.get("tolerance_relative") else f"{tol:g}"
        rep = reported(data)
        key = [c for c in lr.columns if c in data.group_cols] if len(lr) else []
        head = lr[key + ["best_lr", "best_mean", "best_ci95", "usable_lr_min", "usable_lr_max", "width_decades",
                         "diverged_lrs"]] if len(lr) else lr
        head = head.rename(columns={"best_lr": f"best_lr (on {spec.metric})", "best_mean": f"{rep} at best_lr",
                                    "best_ci95": "± 95% CI"})
        cells = lr[key + [c for c in lr.columns if c.startswith("lr=")]] if len(lr) else lr
        comp = self.comparison(data, summ)
        ratios = width_ratios(data, lr)
        md = (f"## LR sensitivity (best LR chosen on {spec.metric_at} {spec.metric}; numbers: {rep}; usable: "
              f"within {tol_s} of the best)\n\n" + markdown_table(head)
              + "\n" + conclusion(comp.values, comp.direction, comp.what) + "\n"
              + "\nRead the width together with the value at the best LR: a norm that barely trains at any LR (e.g. "
                "stays at chance) has every LR within tolerance of its best, so a wide range there means "
                "insensitive because nothing works, not robust.\n"
              + (f"\n### Usable-range widths compared (exploratory; seed bootstrap)\n\n{markdown_table(ratios)}\n"
                 "ratio = the widest configuration's width / the other's (inf: the other's range is its best LR "
                 "alone); difference in decades. 95% CI: percentile interval of 2,000 seed resamples (paired), "
                 "the best LR and the range re-derived in each; widths move in grid steps, so the interval is "
                 "coarse.\n" if len(ratios) else "")
              + f"\n### {rep} at each LR (mean ± 95% CI; [k/n diverged])\n\n"
              + markdown_table(cells) + "\n" + self._per_lr_conclusion(lr, data) + "\n")
        tables = {"lr_sensitivity.csv": lr.drop(columns=["_per_lr", "_best_values"])} if len(lr) else {}
        if len(ratios):
            tables["lr_width_ratios.csv"] = ratios
        return Section(md, [("LR sensitivity", self.plot(data, lr, out))], tables)

    def _per_lr_conclusion(self, lr, data) -> str:
        """At each LR, are the norms distinguishable? (Welch, best norm at that LR vs each other.)"""
        from ..analysis.tables import compare_to_best, config_label

        spec = data.spec
        cols = [c for c in data.group_cols if c != "lr"]
        lrs = sorted({p["lr"] for per in lr["_per_lr"] for p in per}) if len(lr) else []
        parts = []
        for x in lrs:
            values = {}
            for _, r in lr.iterrows():
                for p in r["_per_lr"]:
                    if p["lr"] == x:
                        values[config_label([r[c] for c in cols], cols)] = p["values"]
            best, diffs = compare_to_best(values, spec.direction)
            if best is None:
                parts.append(f"lr {x:g}: no finished runs")
                continue
            clear = [k for k, d in diffs.items() if d.clear]
            parts.append(f"lr {x:g}: {best} best" + (f", clearly ahead of {', '.join(clear)}" if clear else
                                                      ", no clear difference from the others" if diffs else ""))
        return ("**Conclusion per LR** (exploratory; Welch 95% CI of the difference, best vs each): "
                + "; ".join(parts) + ".")

    def plot(self, data, lr_table, out: Path) -> Path | None:
        """Metric vs LR (log x) per norm with 95% CI error bars; x marks LRs where a seed diverged; star = best LR;
        chance line. A sweep of one LR has no LR axis: one point per norm (categorical x), at that LR."""
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        from ..analysis import plots as P
        from ..analysis.tables import config_label

        if lr_table is None or not len(lr_table):
            return None
        spec = data.spec
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        cols = [c for c in lr_table.columns if c in data.group_cols and c != "lr"]
        names = [config_label([r[c] for c in cols], cols) for _, r in lr_table.iterrows()]
        look = P.styles(names)
        cmap = {n: st["color"] for n, st in look.items()}
        lrs = sorted({p["lr"] for per in lr_table["_per_lr"] for p in per})
        single = len(lrs) == 1  # one LR: nothing to plot against it; x = the norms
        pts = [p for per in lr_table["_per_lr"] for p in per if math.isfinite(p["mean"])]
        cis = [p["ci95"] if math.isfinite(p["ci95"]) else 0.0 for p in pts]
        # the y range follows the means (and CIs up to half the means' span): a huge CI from one bad seed is cut
        # at the axis and marked, instead of squashing every other point
        means = [p["mean"] for p in pts] or [0.0, 1.0]
        span = (max(means) - min(means)) or 2 * max(cis, default=0.0) or 0.1  # one mean: show its whole CI
        lo, hi = P.bounds_for(spec.metric, min(p["mean"] - min(c, span / 2) for p, c in zip(pts, cis)) if pts else 0,
                              max(p["mean"] + min(c, span / 2) for p, c in zip(pts, cis)) if pts else 1)
        ch = P.chance(data, spec.metric)
        if ch is not None and lo - 0.05 * (hi - lo) <= ch <= hi + 0.05 * (hi - lo):
            lo, hi = min(lo, ch - 0.02 * (hi - lo)), max(hi, ch)
        any_div, any_cut = False, False
        for i, (name, (_, r)) in enumerate(zip(names, lr_table.iterrows())):
            per = r["_per_lr"]
            k = P.dodge(i, len(names))
            xof = (lambda lr, i=i: i) if single else (lambda lr, k=k: lr * k)
            fin = [p for p in per if math.isfinite(p["mean"])]
            any_cut |= P.errorbars(ax, [xof(p["lr"]) for p in fin], [p["mean"] for p in fin],
                                   [p["ci95"] if math.isfinite(p["ci95"]) else 0 for p in fin], cmap[name], name,
                                   bounds=(lo, hi), marker=look[name]["marker"], ms=5, lw=1.6, ls=look[name]["ls"])
            dx = [xof(p["lr"]) for p in per if p["n_diverged"]]
            if dx:
                any_div = True
                ax.plot(dx, [lo + 0.03 * (hi - lo)] * len(dx), "x", color=cmap[name], ms=10, mew=2.5)
            if r["best_lr"] is not None and r["best_mean"] is not None and math.isfinite(r["best_mean"]):
                if not single:  # (one LR: it is every norm's best; no star)
                    ax.plot([r["best_lr"] * k], [r["best_mean"]], "*", color=cmap[name], ms=15, mec="black",
                            mew=0.6, zorder=5)
        P.chance_line(ax, ch if ch is not None and lo <= ch <= hi else None)
        if single:
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=30 if sum(len(n) for n in names) > 60 else 0, ha="right"
                               if sum(len(n) for n in names) > 60 else "center")
            ax.set_xlim(-0.6, len(names) - 0.4)
        else:
            ax.set_xscale("log")
            ax.set_xticks(lrs)
            ax.set_xticklabels([f"{x:g}" for x in lrs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ylabel = P.metric_label(spec.metric, spec.metric_at, test=data.reports_test)  # (best LR: on validation)
        if spec.metric.endswith("ppl"):  # perplexity = exp(loss): a log axis reads as loss, ratios as distances
            lo = max(lo, 1.0)
            ax.set_yscale("log")
            if hi / lo < 10:  # under a decade the log locators leave gaps (no tick between 10 and 20)
                ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(P.log_ticks(lo, hi)))
                ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ylabel = ylabel.replace(" (exp of nats/token)", "") + " (log scale)"
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"norm (all at peak learning rate {lrs[0]:g}: a single-LR sweep)" if single
                      else "peak learning rate (log scale)")
        ax.set_ylabel(ylabel)
        P.suptitle(fig, P.figure_title(data, f"{spec.metric_at} {spec.metric} per norm at one LR" if single
                                       else "LR sensitivity", "mean ± 95% CI over seeds"))
        ax.grid(alpha=0.3, which="major")
        handles, labels = ax.get_legend_handles_labels()
        if any_div:
            handles.append(plt.Line2D([], [], color="gray", marker="x", ls="", ms=9, mew=2))
            labels.append("diverged (≥1 seed)")
        if not single:
            handles.append(plt.Line2D([], [], color="gray", marker="*", ls="", ms=12, mec="black"))
            labels.append("best LR")
        if any_cut:
            handles.append(plt.Line2D([], [], color="gray", marker="^", ls="", ms=6))
            labels.append("CI continues beyond the axis")
        ax.legend(handles, labels, fontsize=8.5, loc="center left", bbox_to_anchor=(1.01, 0.5), title="norm")
        fig.tight_layout()
        return P.save(fig, out / "lr_sensitivity.png")



def reported(data) -> str:
    """How the reported column reads in a heading: ``final test/acc`` (or the study metric, old trials)."""
    c = data.report_col
    at, _, rest = c.partition("_")
    return f"{at} {rest.replace('_', '/', 1)}"


def usable_range(per_lr: list[dict], best: dict | None, options: dict, direction: str) -> tuple[Any, Any]:
    """[lo, hi]: the longest run of consecutive grid LRs around the best one at which no seed diverged and the
    reported mean is within the spec's tolerance of the best LR's (``definition``); (None, None) without a best."""
    if best is None:
        return None, None
    tol, rel = options.get("tolerance", 0.0), options.get("tolerance_relative", False)
    slack = tol * abs(best["mean"]) if rel else tol

    def usable(p: dict) -> bool:
        if p["n_diverged"] or p["n_ok"] == 0 or not math.isfinite(p["mean"]):
            return False
        return p["mean"] >= best["mean"] - slack if direction == "maximize" else p["mean"] <= best["mean"] + slack

    i = per_lr.index(best)
    j, k = i, i
    while j - 1 >= 0 and usable(per_lr[j - 1]):
        j -= 1
    while k + 1 < len(per_lr) and usable(per_lr[k + 1]):
        k += 1
    return per_lr[j]["lr"], per_lr[k]["lr"]


def _widths(sel, div, rep, lrs, idx, options: dict, direction: str):
    """Usable-range width (decades) of one configuration in each seed resample (rows of ``idx``): the best LR on
    ``sel`` (validation), the range on ``rep``. Arrays (n_seeds, n_lrs); NaN where no LR is a candidate."""
    import numpy as np

    from ..analysis.verdicts import _nanmean, best_index

    v, d, r = sel[idx], div[idx].any(axis=1), rep[idx]  # (B, n, L), (B, L), (B, n, L)
    sm, rm = _nanmean(v, axis=1), _nanmean(r, axis=1)  # (B, L)
    ok = ~d & np.isfinite(sm)
    best, none = best_index(sm, ok, direction)
    b = np.take_along_axis(rm, best[:, None], axis=1)[:, 0]
    tol = options.get("tolerance", 0.0)
    slack = tol * np.abs(b) if options.get("tolerance_relative", False) else tol
    within = (rm >= (b - slack)[:, None]) if direction == "maximize" else (rm <= (b + slack)[:, None])
    usable = ok & np.isfinite(rm) & within
    L = sel.shape[1]
    lo, hi = best.copy(), best.copy()
    for _ in range(L):
        step = (lo > 0) & usable[np.arange(len(lo)), np.maximum(lo - 1, 0)] & (lo - 1 >= 0)
        lo = np.where(step, lo - 1, lo)
        step = (hi < L - 1) & usable[np.arange(len(hi)), np.minimum(hi + 1, L - 1)]
        hi = np.where(step, hi + 1, hi)
    lg = np.log10(np.asarray(lrs, float))
    return np.where(none | ~np.isfinite(b), np.nan, lg[hi] - lg[lo])


def width_ratios(data, lr_table, samples: int = 2000, seed: int = 0):
    """Each configuration's usable-range width against the widest one's: ratio and difference (decades) with a
    95% seed-bootstrap CI (paired: one seed draw for every configuration; the best LR and the range re-derived
    in each resample). Exploratory. Empty when fewer than two configurations or no seed axis."""
    import numpy as np
    import pandas as pd

    from ..analysis.data import mask_for
    from ..analysis.tables import config_label

    df, spec = data.trials, data.spec
    if len(lr_table) < 2 or "seed" not in df or lr_table["width_decades"].isna().all():
        return pd.DataFrame()
    cols = [c for c in data.group_cols if c != "lr"]
    seeds = sorted(set(df["seed"].tolist()), key=str)
    lrs = sorted({float(x) for x in df["lr"]})
    si, li = {s: i for i, s in enumerate(seeds)}, {x: j for j, x in enumerate(lrs)}
    arrays = {}
    for _, r in lr_table.iterrows():
        sub = df[mask_for(df, cols, [r[c] for c in cols])]
        sel, rep = np.full((len(seeds), len(lrs)), np.nan), np.full((len(seeds), len(lrs)), np.nan)
        div = np.zeros((len(seeds), len(lrs)), bool)
        for t in sub.to_dict("records"):
            i, j = si[t["seed"]], li[float(t["lr"])]
            if bool(t["diverged"]):
                div[i, j] = True
            elif t["state"] == "complete":
                sel[i, j] = t.get(data.metric_col, np.nan)
                rep[i, j] = t.get(data.report_col, np.nan)
        arrays[config_label([r[c] for c in cols], cols)] = (sel.astype(float), div, rep.astype(float))
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.arange(len(seeds))[None], rng.integers(0, len(seeds), (samples, len(seeds)))])
    w = {k: _widths(*a, lrs, idx, spec.options, spec.direction) for k, a in arrays.items()}
    ref = max(w, key=lambda k: -1.0 if not np.isfinite(w[k][0]) else w[k][0])
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in w:
            if k == ref:
                continue
            ratio, diff = w[ref] / w[k], w[ref] - w[k]
            ratio = np.where((w[ref] == 0) & (w[k] == 0), 1.0, ratio)

            def ci(x):
                x = x[1:][~np.isnan(x[1:])]
                if not len(x):
                    return "–"
                lo, hi = np.quantile(x, 0.025, method="lower"), np.quantile(x, 0.975, method="higher")
                return f"[{lo:.3g}, {hi:.3g}]"

            out.append({"widest": ref, "other": k, "width_widest": w[ref][0], "width_other": w[k][0],
                        "ratio": ratio[0], "ratio_95ci": ci(ratio), "difference_decades": diff[0],
                        "difference_95ci": ci(diff)})
    return pd.DataFrame(out)
