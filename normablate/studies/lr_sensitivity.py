"""``lr_sensitivity``: the study metric against the learning rate, per norm; best LR and usable-range width."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import register
from .base import Comparison, Section, SpecContext, StudyKind


@register("lr_sensitivity")
class LRSensitivity(StudyKind):
    keys = ("tolerance", "tolerance_relative")
    definition = """\
* ``lr_sensitivity``: m(lr) is the mean over non-diverged seeds of the study metric at a grid LR. The best LR l*
  is the LR with the best m among the LRs at which no seed diverged. An LR is *usable* when no seed diverged
  at it and m(lr) is within ``tolerance`` of m(l*) (at least m(l*) - tol when maximizing, at most m(l*) + tol
  when minimizing; tol is in the metric's units, or tol * |m(l*)| with ``tolerance_relative: true``). The
  usable range [lo, hi] is the longest run of consecutive grid LRs that contains l* and is usable throughout;
  its width is log10(hi / lo) decades: 0 when only l* is usable, a lower bound set by the grid's spacing."""

    def check(self, raw: dict[str, Any], ctx: SpecContext) -> dict[str, Any]:
        ctx.need_axis(self.name, "optim.lr", "optim.lr: {logspace: [0.001, 1.0, 7]}")
        tol = raw.get("tolerance", 0.05 if ctx.task == "classification" else 0.1)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
            raise ConfigError(f"{ctx.where}: tolerance={tol!r} must be a number >= 0")
        rel = raw.get("tolerance_relative", False)
        if not isinstance(rel, bool):
            raise ConfigError(f"{ctx.where}: tolerance_relative must be true or false")
        return {"tolerance": float(tol), "tolerance_relative": rel}

    # ------------------------------------------------------------------ report
    def table(self, data):
        """Per norm (and any other non-LR axis): best LR, metric at each LR, diverged LRs, usable-range width."""
        import pandas as pd

        from ..analysis.data import groups
        from ..analysis.tables import better, cell

        spec, df = data.spec, data.trials
        metric = data.metric_col
        is_better = better(spec.direction)
        tol, rel = spec.options.get("tolerance", 0.0), spec.options.get("tolerance_relative", False)
        cols = [c for c in data.group_cols if c != "lr"]
        out = []
        for key, sub in groups(df, cols):
            row: dict[str, Any] = dict(zip(cols, key))
            per_lr = []
            for lr, s in sorted(sub.groupby("lr"), key=lambda kv: float(kv[0])):
                m, ci, n, nd, text = cell(s, metric)
                ok = s[(~s["diverged"].astype(bool)) & (s["state"] == "complete")]
                per_lr.append({"lr": float(lr), "mean": m, "ci95": ci, "n": len(s), "n_ok": n, "n_diverged": nd,
                               "text": text, "values": ok[metric].tolist() if metric in ok else []})
            stable = [p for p in per_lr if p["n_diverged"] == 0 and p["n_ok"] > 0 and math.isfinite(p["mean"])]
            best = None
            for p in stable:
                if best is None or is_better(p["mean"], best["mean"]):
                    best = p
            lo = hi = None
            if best is not None:
                slack = tol * abs(best["mean"]) if rel else tol

                def usable(p: dict) -> bool:
                    if p["n_diverged"] or p["n_ok"] == 0 or not math.isfinite(p["mean"]):
                        return False
                    return p["mean"] >= best["mean"] - slack if spec.direction == "maximize" \
                        else p["mean"] <= best["mean"] + slack

                i = per_lr.index(best)
                j, k = i, i
                while j - 1 >= 0 and usable(per_lr[j - 1]):
                    j -= 1
                while k + 1 < len(per_lr) and usable(per_lr[k + 1]):
                    k += 1
                lo, hi = per_lr[j]["lr"], per_lr[k]["lr"]
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
        return Comparison(f"{spec.metric_at} {spec.metric} at its best LR", values, spec.direction)

    def section(self, data, summ, out: Path) -> Section:
        from ..analysis.tables import conclusion, markdown_table

        spec = data.spec
        lr = self.table(data)
        tol = spec.options["tolerance"]
        tol_s = f"{tol:g} x |best|" if spec.options.get("tolerance_relative") else f"{tol:g}"
        key = [c for c in lr.columns if c in data.group_cols] if len(lr) else []
        head = lr[key + ["best_lr", "best_mean", "best_ci95", "usable_lr_min", "usable_lr_max", "width_decades",
                         "diverged_lrs"]] if len(lr) else lr
        cells = lr[key + [c for c in lr.columns if c.startswith("lr=")]] if len(lr) else lr
        comp = self.comparison(data, summ)
        md = (f"## LR sensitivity ({spec.metric_at} {spec.metric}, tolerance {tol_s})\n\n" + markdown_table(head)
              + "\n" + conclusion(comp.values, comp.direction, comp.what) + "\n"
              + "\nRead the width together with best_mean: a norm that barely trains at any LR (e.g. stays at "
                "chance) has every LR within tolerance of its best, so a wide range there means insensitive "
                "because nothing works, not robust.\n"
              + f"\n### {spec.metric_at} {spec.metric} at each LR (mean ± 95% CI; [k/n diverged])\n\n"
              + markdown_table(cells) + "\n" + self._per_lr_conclusion(lr, data) + "\n")
        tables = {"lr_sensitivity.csv": lr.drop(columns=["_per_lr", "_best_values"])} if len(lr) else {}
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
        chance line."""
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
        cmap = P.colors(names)
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
            fin = [p for p in per if math.isfinite(p["mean"])]
            any_cut |= P.errorbars(ax, [p["lr"] * k for p in fin], [p["mean"] for p in fin],
                                   [p["ci95"] if math.isfinite(p["ci95"]) else 0 for p in fin], cmap[name], name,
                                   bounds=(lo, hi), marker="o", ms=5, lw=1.6)
            dx = [p["lr"] * k for p in per if p["n_diverged"]]
            if dx:
                any_div = True
                ax.plot(dx, [lo + 0.03 * (hi - lo)] * len(dx), "x", color=cmap[name], ms=10, mew=2.5)
            if r["best_lr"] is not None and r["best_mean"] is not None and math.isfinite(r["best_mean"]):
                ax.plot([r["best_lr"] * k], [r["best_mean"]], "*", color=cmap[name], ms=15, mec="black", mew=0.6,
                        zorder=5)
        P.chance_line(ax, ch if ch is not None and lo <= ch <= hi else None)
        ax.set_xscale("log")
        lrs = sorted({p["lr"] for per in lr_table["_per_lr"] for p in per})
        ax.set_xticks(lrs)
        ax.set_xticklabels([f"{x:g}" for x in lrs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ylabel = P.metric_label(spec.metric, spec.metric_at)
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
        ax.set_xlabel("peak learning rate (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{data.name}: LR sensitivity (mean ± 95% CI over seeds)")
        ax.grid(alpha=0.3, which="major")
        handles, labels = ax.get_legend_handles_labels()
        if any_div:
            handles.append(plt.Line2D([], [], color="gray", marker="x", ls="", ms=9, mew=2))
            labels.append("diverged (≥1 seed)")
        handles.append(plt.Line2D([], [], color="gray", marker="*", ls="", ms=12, mec="black"))
        labels.append("best LR")
        if any_cut:
            handles.append(plt.Line2D([], [], color="gray", marker="^", ls="", ms=6))
            labels.append("CI continues beyond the axis")
        ax.legend(handles, labels, fontsize=8.5, loc="center left", bbox_to_anchor=(1.01, 0.5), title="norm")
        fig.tight_layout()
        return P.save(fig, out / "lr_sensitivity.png")

