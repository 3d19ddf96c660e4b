"""The report's figures (matplotlib, Agg backend): titles, axis labels with units, log axes where apt, legends."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import StudyData, col  # noqa: E402
from .stats import mean_ci  # noqa: E402

METRIC_LABELS = {
    "val/acc": "validation accuracy (fraction correct)",
    "val/loss": "validation loss (cross-entropy, nats)",
    "val/ppl": "validation perplexity (exp of nats/token)",
}
DPI = 130


def metric_label(m: str, at: str = "final") -> str:
    return f"{'final' if at == 'final' else 'best'} {METRIC_LABELS.get(m, m)}"


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _norms(data: StudyData) -> list[str]:
    return list(dict.fromkeys(data.trials["norm"])) if len(data.trials) else []


def _mean_curve(curves: list[list[list]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (and count) over runs at each step any run has; runs that stopped early (diverged) drop out."""
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            if v is not None and math.isfinite(v):
                by_step.setdefault(int(s), []).append(float(v))
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps]), np.array([len(by_step[s]) for s in steps])


def loss_curves(data: StudyData, out: Path) -> Path | None:
    """train/loss vs step, mean over seeds, one line per norm; one panel per value of the other axes."""
    df = data.trials
    if not len(df) or not data.histories:
        return None
    panel_cols = [c for c in data.group_cols if c not in ("norm",)]
    panels = list(dict.fromkeys(tuple(r[c] for c in panel_cols) for _, r in df.iterrows())) if panel_cols else [()]
    n = len(panels)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.5, 3.4 * nrows + 0.8), squeeze=False,
                             sharey=True)
    norms = _norms(data)
    colors = _colors(norms)
    line_key = "group" if data.spec.kind == "search" else "norm"
    if line_key == "group":
        norms = list(dict.fromkeys(df["group"]))
        colors = _colors(norms)
    seeds = df.groupby(data.group_cols, dropna=False).size().max()
    drew = False
    per_sample = data.spec.kind == "batch_size" and "batch_size_used" in df
    any_diverged = bool(df["diverged"].astype(bool).any())
    ylo, yhi = math.inf, 0.0
    ends: list[tuple] = []  # where diverged curves stop: (step, loss, color), drawn after the y range is known
    for ax, panel in zip(axes.flat, panels):
        ends = []
        mask = np.ones(len(df), bool)
        for c, v in zip(panel_cols, panel):
            mask &= (df[c] == v).to_numpy()
        for name in norms:
            rows = df.index[mask & (df[line_key] == name).to_numpy()]
            curves = [data.histories.get(i, {}).get("train/loss", []) for i in rows]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps, mean, _ = _mean_curve(curves)
            if not len(steps):
                continue
            if per_sample:  # batch-size studies: compare at equal samples seen, not equal steps
                steps = steps * float(df.loc[rows[0], "batch_size_used"])
            ax.plot(steps, mean, color=colors[name], label=name, lw=1.6)
            drew = True
            if df.loc[rows, "diverged"].astype(bool).any():
                ends.append((steps[-1], mean[-1], colors[name]))
            else:
                ylo = min(ylo, float(np.min(mean)))
                yhi = max(yhi, float(mean[0]), float(np.median(mean)))
        ax.set_yscale("log")
        ax._nb_ends = ends  # type: ignore[attr-defined]
        ax.set_title(", ".join(f"{c}={_fmt(v)}" for c, v in zip(panel_cols, panel)) or "all runs", fontsize=10)
        ax.set_xlabel("training samples seen" if per_sample else "optimizer step")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (nats, log scale)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if not drew:
        plt.close(fig)
        return None
    # a diverging curve would squash the others: clip at twice the typical start; its x sits at the edge
    top = 2.0 * yhi if yhi > 0 else None
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax in list(axes.flat)[:n]:
        if top is not None and ylo < top:
            ax.set_ylim(ylo / 1.3, top)
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        for s, v, c in getattr(ax, "_nb_ends", []):
            ax.plot(s, min(v, top) if top is not None and math.isfinite(v) else (top or v), "x", color=c, ms=10,
                    mew=2.5, clip_on=False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    if any_diverged:
        handles.append(plt.Line2D([], [], color="gray", marker="x", ls="", ms=8, mew=2))
        labels.append("run(s) diverged")
    fig.legend(handles, labels, loc="center right", title=line_key, frameon=False)
    fig.suptitle(f"{data.name}: training loss per {line_key} (mean over up to {seeds} seed(s))")
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bounds(metric: str, lo: float, hi: float) -> tuple[float, float]:
    """y range from the data (means and CIs), kept inside the metric's natural range (accuracy in [0, 1])."""
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    if metric.endswith("acc"):
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return max(lo, 0.0) if metric.endswith(("loss", "ppl")) else lo, hi


def _dodge(i: int, n: int, log: bool = True) -> float:
    """Multiplicative x offset for line i of n, so error bars at the same x do not hide each other."""
    return 10 ** (0.012 * (i - (n - 1) / 2)) if log else 1.0


def lr_curves(data: StudyData, lr_table, out: Path) -> Path | None:
    """Metric vs LR (log x) per norm with 95% CI error bars; x marks LRs where a seed diverged; star = best LR."""
    if lr_table is None or not len(lr_table):
        return None
    spec = data.spec
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = [" ".join(_fmt(r[c]) for c in lr_table.columns if c in data.group_cols and c != "lr")
             for _, r in lr_table.iterrows()]
    colors = _colors(names)
    pts = [p for per in lr_table["_per_lr"] for p in per if math.isfinite(p["mean"])]
    cis = [p["ci95"] if math.isfinite(p["ci95"]) else 0.0 for p in pts]
    lo, hi = _bounds(spec.metric, min((p["mean"] - c for p, c in zip(pts, cis)), default=0.0),
                     max((p["mean"] + c for p, c in zip(pts, cis)), default=1.0))
    bottom = lo + 0.02 * (hi - lo)
    any_div = False
    for i, (name, (_, r)) in enumerate(zip(names, lr_table.iterrows())):
        per = r["_per_lr"]
        k = _dodge(i, len(names))
        xs = [p["lr"] * k for p in per if math.isfinite(p["mean"])]
        ys = [p["mean"] for p in per if math.isfinite(p["mean"])]
        es = [0 if not math.isfinite(p["ci95"]) else p["ci95"] for p in per if math.isfinite(p["mean"])]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=5, capsize=3, lw=1.6, color=colors[name], label=name)
        dx = [p["lr"] * k for p in per if p["n_diverged"]]
        if dx:
            any_div = True
            ax.plot(dx, [bottom] * len(dx), "x", color=colors[name], ms=10, mew=2.5, clip_on=False)
        if r["best_lr"] is not None and r["best_mean"] is not None and math.isfinite(r["best_mean"]):
            ax.plot([r["best_lr"] * k], [r["best_mean"]], "*", color=colors[name], ms=14, mec="black", mew=0.6)
    ax.set_xscale("log")
    lrs = sorted({p["lr"] for per in lr_table["_per_lr"] for p in per})
    ax.set_xticks(lrs)
    ax.set_xticklabels([f"{x:g}" for x in lrs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(lo, hi)
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel(metric_label(spec.metric, spec.metric_at))
    ax.set_title(f"{data.name}: LR sensitivity (mean ± 95% CI over seeds)")
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if any_div:
        handles.append(plt.Line2D([], [], color="gray", marker="x", ls="", ms=9, mew=2))
        labels.append("diverged (≥1 seed)")
    handles.append(plt.Line2D([], [], color="gray", marker="*", ls="", ms=12, mec="black"))
    labels.append("best LR")
    ax.legend(handles, labels, fontsize=9, loc="best", title="norm")
    fig.tight_layout()
    path = out / "lr_sensitivity.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def batch_curves(data: StudyData, out: Path) -> Path | None:
    df, spec = data.trials, data.spec
    metric = col(spec.metric, spec.metric_at)
    if not len(df) or metric not in df:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cols = [c for c in data.group_cols if c != "batch_size"]
    keys = list(dict.fromkeys(tuple(r[c] for c in cols) for _, r in df.iterrows()))
    colors = _colors([" ".join(map(_fmt, k)) for k in keys])
    ylo, yhi = math.inf, -math.inf
    for i, k in enumerate(keys):
        name = " ".join(map(_fmt, k))
        mask = np.ones(len(df), bool)
        for c, v in zip(cols, k):
            mask &= (df[c] == v).to_numpy()
        sub = df[mask]
        xs, ys, es, dx = [], [], [], []
        for bs, s in sorted(sub.groupby("batch_size"), key=lambda kv: int(kv[0])):
            ok = s[(~s["diverged"].astype(bool)) & (s["state"] == "complete")]
            m, ci, n = mean_ci(ok[metric].tolist())
            if s["diverged"].astype(bool).any():
                dx.append(int(bs))
            if n:
                xs.append(int(bs) * _dodge(i, len(keys)))
                ys.append(m)
                es.append(ci if math.isfinite(ci) else 0)
                ylo, yhi = min(ylo, m - es[-1]), max(yhi, m + es[-1])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=1.6, color=colors[name], label=name)
        if dx:
            ax.plot(dx, [min(ys or [0])] * len(dx), "x", color=colors[name], ms=10, mew=2.5)
    ax.set_xscale("log", base=2)
    if math.isfinite(ylo):
        ax.set_ylim(*_bounds(spec.metric, ylo, yhi))
    bss = sorted(set(int(b) for b in df["batch_size"]))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(bss)
    ax.set_xticklabels([str(b) for b in bss])
    ax.set_xlabel("batch size (samples per step, log scale)")
    ax.set_ylabel(metric_label(spec.metric, spec.metric_at))
    rule, budget = spec.options.get("lr_scaling"), spec.options.get("budget")
    ax.set_title(f"{data.name}: metric vs batch size (LR rule: {rule}; budget: {budget})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="norm", fontsize=9)
    fig.tight_layout()
    path = out / "batch_size.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def bars(data: StudyData, summ, out: Path, what: list[tuple[str, str]], name: str, title: str) -> Path | None:
    """Bar chart(s) of summary columns with 95% CI error bars, one bar per configuration."""
    if summ is None or not len(summ):
        return None
    what = [(c, lab) for c, lab in what if f"{c}_mean" in summ]
    if not what:
        return None
    labels = [" ".join(_fmt(r[c]) for c in data.group_cols) for _, r in summ.iterrows()]
    colors = _colors(list(dict.fromkeys(summ[data.group_cols[0]])))
    fig, axes = plt.subplots(1, len(what), figsize=(max(4.5, 0.9 * len(labels) + 2) * len(what), 4.6), squeeze=False)
    for ax, (c, lab) in zip(axes[0], what):
        means = summ[f"{c}_mean"].astype(float).to_numpy()
        cis = np.nan_to_num(summ[f"{c}_ci95"].astype(float).to_numpy())
        x = np.arange(len(labels))
        ax.bar(x, np.nan_to_num(means), yerr=cis, capsize=4,
               color=[colors[v] for v in summ[data.group_cols[0]]], edgecolor="black", lw=0.5)
        for i, (_, r) in enumerate(summ.iterrows()):
            if c == "steps_to_target" or c == "time_to_target":
                note = f"{int(r.get('n_reached', 0) or 0)}/{int(r['n'])} reached"
            else:
                note = f"n={int(r['n']) - int(r['n_diverged']) - int(r.get('n_pruned', 0) or 0)}"
            top = (means[i] if math.isfinite(means[i]) else 0) + cis[i]
            ax.annotate(note, (i, top), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
            if not math.isfinite(means[i]):
                ax.annotate("none", (i, 0), ha="center", va="bottom", fontsize=8, color="red")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 6 else 0, ha="right"
                           if max(map(len, labels)) > 6 else "center")
        ax.set_ylabel(lab)
        ax.set_xlabel(" / ".join(data.group_cols))
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.15)
    fig.suptitle(f"{data.name}: {title} (mean ± 95% CI over seeds)")
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def search_history(data: StudyData, out: Path) -> Path | None:
    df, spec = data.trials, data.spec
    if not len(df):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    groups = list(dict.fromkeys(df["group"]))
    colors = _colors(groups)
    sign = 1 if spec.direction == "maximize" else -1
    for g in groups:
        sub = df[(df["group"] == g) & (df["state"] == "complete")].sort_values("trial")
        vals = [v if v is not None and math.isfinite(v) else math.nan for v in sub["value"]]
        best, run = [], -math.inf
        for v in vals:
            if math.isfinite(v):
                run = max(run, sign * v)
            best.append(sign * run if math.isfinite(run) else math.nan)
        ax.plot(sub["trial"], vals, "o", color=colors[g], alpha=0.4, ms=4)
        ax.step(sub["trial"], best, where="post", color=colors[g], lw=1.8, label=f"{g} (best so far)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial number (within the group's study)")
    ax.set_ylabel(metric_label(spec.metric, spec.metric_at))
    ax.set_title(f"{data.name}: search progress per group (dots: trials; diverged not shown)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    path = out / "search_history.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
