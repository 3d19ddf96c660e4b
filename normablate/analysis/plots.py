"""Figure helpers (matplotlib, Agg backend) shared by every study kind and the report.

Conventions: a line is the mean over seeds and the shaded band around it spans the seeds (min to max), so
one look shows both the effect and the seed-to-seed spread; y ranges follow the bulk of the data (robust to
a diverging run, which is marked with an x where it stops); a dotted grey line marks chance (uniform
prediction) where the metric has one; error bars are 95% CIs over seeds, never cut silently: where one
leaves the axis (e.g. an accuracy CI beyond [0, 1]) a small triangle marks the cut.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from .data import StudyData, mask_for  # noqa: E402
from .tables import config_label, trial_classes  # noqa: E402

METRIC_LABELS = {
    "val/acc": "validation accuracy (fraction correct)",
    "val/loss": "validation loss (cross-entropy, nats)",
    "val/ppl": "validation perplexity (exp of nats/token)",
}
DPI = 150
plt.rcParams.update({"font.size": 10, "axes.titlesize": 10.5, "axes.spines.top": False,
                     "axes.spines.right": False, "legend.frameon": False})


def metric_label(m: str, at: str = "final", test: bool = False) -> str:
    """Axis label of a study metric; ``test``: the numbers shown are its test-split counterpart (the report's), at
    the final weights or at the weights the best validation picked (never a maximum over test)."""
    if test:
        what = METRIC_LABELS.get(m, m).replace("validation ", "", 1)
        return f"test {what}, {'final weights' if at == 'final' else 'best-validation weights'}"
    return f"{'final' if at == 'final' else 'best'} {METRIC_LABELS.get(m, m)}"


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
HATCHES = ("", "//", "..", "xx")


def styles(names: list[str]) -> dict[str, dict]:
    """A distinct look per name: ``{"color", "ls", "marker", "hatch"}``. The first ten names get tab10's colours
    with solid lines (circles, plain bars), the next ten the same colours dashed (squares, hatched bars), then
    dotted and dash-dotted: 40 distinct (colour, style) pairs. Not tab20: its light/dark pairs of one hue are
    hard to tell apart in a legend, a dash is not."""
    cmap = plt.get_cmap("tab10")
    out = {}
    for i, n in enumerate(names):
        k = (i // 10) % len(LINESTYLES)
        out[n] = {"color": cmap(i % 10), "ls": LINESTYLES[k], "marker": MARKERS[k], "hatch": HATCHES[k]}
    return out


def colors(names: list[str]) -> dict[str, tuple]:
    return {n: s["color"] for n, s in styles(names).items()}


def fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def suptitle(fig, text: str, fontsize: float = 10.5) -> None:
    """A figure title wrapped to the figure's width (a long title must not widen the saved image)."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), fontsize=fontsize)


# ------------------------------------------------------------------------------------------ titles
BACKBONES = {"vit": "ViT", "transformer_lm": "Transformer LM"}
SOURCES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST",
           "tiny_shakespeare": "Tiny Shakespeare", "shakespeare": "Shakespeare", "ptb": "PTB"}
NORMS = {"bn": "BN", "ln": "LN", "gn": "GN", "rms": "RMSNorm", "noisy_bn": "noisy BN", "masked_bn": "masked BN",
         "dyt": "DyT", "powernorm": "PowerNorm", "batch_renorm": "Batch Renorm", "none": "none"}


def pretty_backbone(name: str) -> str:
    import re

    m = re.fullmatch(r"(resnet|vgg)(\d+)", str(name))
    if m:
        return {"resnet": "ResNet", "vgg": "VGG"}[m.group(1)] + "-" + m.group(2)
    return BACKBONES.get(str(name), str(name))


def pretty_source(source, task: str | None) -> str:
    if source in (None, "synthetic"):
        from .. import tasks

        return "synthetic " + (tasks.get(task).modality if task in tasks.REGISTRY else "images")
    base = Path(str(source).rstrip("/")).name
    return SOURCES.get(base.lower(), base)


def pretty_norm(label: str) -> str:
    """``bn`` -> ``BN``, ``bn(momentum=0.01)`` -> ``BN(momentum=0.01)``."""
    head, paren, rest = str(label).partition("(")
    return NORMS.get(head, head) + paren + rest


def spec_values(spec, key: str) -> list:
    """The values of run-config key ``key`` (dotted) across a sweep: its grid axis, else the overrides, else the
    base config, else the run-config default."""
    for a in getattr(spec, "axes", []) or []:
        if getattr(a, "key", None) == key:
            return list(a.values)
    overrides = getattr(spec, "overrides", None) or {}
    if key in overrides:
        return [overrides[key]]
    from ..dotted import get_dotted

    cur = get_dotted(getattr(spec, "base", None) or {}, key)
    if cur is not None:
        return [cur]
    if key == "model.backbone":
        from ..config import ModelConfig

        return [ModelConfig().backbone]
    return []


def headline(data: StudyData) -> str:
    """What a study is, in words: the spec's ``description``, else "<backbone> on <data>: <norm> vs <norm>"
    (e.g. "VGG-11 on CIFAR-10: BN vs none"), never the internal study name alone."""
    desc = str(getattr(data.spec, "description", "") or "").strip()
    if desc:
        return desc
    df = data.trials
    backbones = [pretty_backbone(b) for b in dict.fromkeys(spec_values(data.spec, "model.backbone"))]
    task = df["task"].iloc[0] if len(df) and "task" in df else None
    sources = [pretty_source(s, task) for s in dict.fromkeys(df["source"] if "source" in df and len(df)
                                                                 else spec_values(data.spec, "data.source"))]
    norms = [pretty_norm(n) for n in dict.fromkeys(df["norm"])] if "norm" in df and len(df) else []
    text = f"{' / '.join(backbones) or 'model'} on {' / '.join(sources) or 'data'}"
    if 0 < len(norms) <= 4:
        text += ": " + " vs ".join(norms)
    elif norms:  # e.g. 20 momenta of BN: "20 norm settings (BN)"
        text += f": {len(norms)} norm settings ({', '.join(dict.fromkeys(n.partition('(')[0] for n in norms))})"
    return text


def seeds_text(data: StudyData) -> str:
    """n per point: "n = 3 seeds per point" (finished, non-diverged runs of each configuration), or a range."""
    from .data import groups, ok_rows

    df = data.trials
    cols = [c for c in data.group_cols if c in df] if len(df) else []
    sizes = [len(ok_rows(sub)) for _, sub in groups(df, cols)] if cols else []
    if not sizes:
        return "n = 0 seeds per point"
    lo, hi = min(sizes), max(sizes)
    return f"n = {lo}{'' if lo == hi else f'–{hi}'} seed{'s' if hi != 1 else ''} per point"


def figure_title(data: StudyData, what: str, how: str = "") -> str:
    """A figure title: the study in words, what the figure shows, then how to read it with n per point."""
    return f"{headline(data)} — {what}\n" + (f"{how}; " if how else "") + seeds_text(data)


def mark_clipped(ax, x, lo_vals, hi_vals, color, bounds: tuple[float, float]) -> bool:
    """Triangles at the axis edge where a band or line leaves the y range ``bounds`` (▲ above, ▼ below), the
    marks ``errorbars`` uses for a cut CI. Returns whether anything was cut."""
    lo, hi = bounds
    x, lo_vals, hi_vals = np.asarray(x, float), np.asarray(lo_vals, float), np.asarray(hi_vals, float)
    up, down = hi_vals > hi, lo_vals < lo
    if up.any():
        ax.plot(x[up], np.full(int(up.sum()), hi), "^", color=color, ms=5, clip_on=False, ls="")
    if down.any():
        ax.plot(x[down], np.full(int(down.sum()), lo), "v", color=color, ms=5, clip_on=False, ls="")
    return bool(up.any() or down.any())


CLIP_HANDLE = ("^", "beyond the axis (cut; ▲ above, ▼ below)")


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ chance levels


def chance(data: StudyData, metric: str) -> float | None:
    """The metric's value for a uniform prediction over K outcomes (accuracy 1/K, loss ln K, perplexity K; 10
    classes: 0.1, ln 10; byte LM: ln 256), K from the task's ``chance_outcomes`` fact (a count, or
    ``"num_classes"``: the trials' configs); None when K is unknown."""
    from .tables import study_task

    df = data.trials
    if not len(df) or "task" not in df:
        return None
    info = study_task(data)  # None: trials from before runs recorded their task (image classification)
    names = (*info.metrics, "train/loss") if info is not None else ("val/acc", "val/loss", "train/loss")
    if metric not in names:
        return None
    k = info.chance_outcomes if info is not None else "num_classes"
    if k == "num_classes":
        k = _classes(df)
    if k is None or isinstance(k, str):  # unknown, or a fact the trials do not record
        return None
    return {"acc": 1.0 / k, "loss": math.log(k), "ppl": float(k)}.get(metric.split("/", 1)[1])


def _classes(df) -> int | None:
    """The trials' one class count (``tables.classes``: recorded, else the source's known one); None if unknown or
    mixed."""
    found = set(trial_classes(df))
    if len(found) != 1 or None in found:
        return None
    return found.pop()


def chance_line(ax, value: float | None, label: str = "chance (uniform prediction)") -> None:
    if value is not None and math.isfinite(value):
        ax.axhline(value, color="0.45", ls=":", lw=1.2, label=label, zorder=0)


# ------------------------------------------------------------------------------------------ curves
def seed_band(curves: list[list[list]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over runs at each step any run has; runs that stopped early drop out."""
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for s, v in c:
            if v is not None and math.isfinite(v):
                by_step.setdefault(int(s), []).append(float(v))
    steps = np.array(sorted(by_step))
    vals = [by_step[s] for s in steps]
    return (steps, np.array([np.mean(v) for v in vals]), np.array([np.min(v) for v in vals]),
            np.array([np.max(v) for v in vals]))


def robust_range(values: list[np.ndarray], lo_q: float = 1.0, hi_q: float = 99.0, pad: float = 0.06,
                 floor: float | None = None) -> tuple[float, float] | None:
    """A y range covering the bulk of the values (percentiles), padded; None when there is nothing finite."""
    xs = np.concatenate([v[np.isfinite(v)] for v in values if len(v)]) if values else np.array([])
    if not len(xs):
        return None
    lo, hi = np.percentile(xs, lo_q), np.percentile(xs, hi_q)
    span = (hi - lo) or abs(hi) or 1.0
    lo, hi = lo - pad * span, hi + pad * span
    if floor is not None:
        lo = max(lo, floor)
    return float(lo), float(hi)


def line_with_band(ax, curves, color, label, x_scale: float = 1.0, lw: float = 1.7, ls: str = "-"):
    steps, mean, lo, hi = seed_band(curves)
    if not len(steps):
        return None
    x = steps * x_scale
    ax.plot(x, mean, color=color, label=label, lw=lw, ls=ls)
    if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    return x, mean, lo, hi


def panels_of(data: StudyData, exclude: tuple[str, ...]) -> tuple[list[str], list[tuple]]:
    cols = [c for c in data.group_cols if c not in exclude]
    df = data.trials
    keys = list(dict.fromkeys(tuple(r[c] for c in cols) for _, r in df.iterrows())) if cols else [()]
    return cols, keys


def grid(n: int, w: float = 4.3, h: float = 3.3, max_cols: int = 4):
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols + 1.6, h * nrows + 0.9), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def shared_legend(fig, axes, title: str, extra: list[tuple] = ()) -> None:
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title=title)


def loss_curves(data: StudyData, out: Path, per_sample: bool = False) -> Path | None:
    """Training loss vs step per ``data.line_key`` (mean over seeds, band = seed range), one panel per value of
    the other configuration columns; robust y range; chance line; x where diverged runs stop."""
    df = data.trials
    if not len(df) or not data.histories:
        return None
    line_key = data.line_key
    panel_cols, panels = panels_of(data, (line_key,))
    names = list(dict.fromkeys(df[line_key]))
    look = styles(names)
    cmap = {n: s["color"] for n, s in look.items()}
    fig, axes = grid(len(panels))
    ch = chance(data, "train/loss")
    bulk: list[np.ndarray] = []
    ends = []
    drew = False
    for ax, panel in zip(axes.flat, panels):
        m = mask_for(df, panel_cols, panel)
        for name in names:
            rows = df.index[m & (df[line_key] == name).to_numpy()]
            curves = data.curves(rows, "train/loss")
            if not curves:
                continue
            scale = float(df.loc[rows[0], "batch_size_used"]) if per_sample and "batch_size_used" in df else 1.0
            res = line_with_band(ax, curves, cmap[name], name, scale, ls=look[name]["ls"])
            if res is None:
                continue
            drew = True
            x, mean, lo, hi = res
            if df.loc[rows, "diverged"].astype(bool).any():
                ends.append((ax, x[-1], mean[-1], cmap[name]))
            else:
                bulk += [mean[len(mean) // 20:], lo[len(lo) // 20:], hi[len(hi) // 20:]]
        chance_line(ax, ch)
        ax.set_title(", ".join(f"{c}={fmt(v)}" for c, v in zip(panel_cols, panel)) or "all runs")
        ax.set_xlabel("training samples seen" if per_sample else "optimizer step")
        ax.grid(alpha=0.3)
    if not drew:
        plt.close(fig)
        return None
    rng = robust_range(bulk, floor=0.0)
    if rng and ch is not None:  # the chance line is always in view (a percentile cut would drop its one value)
        span = rng[1] - rng[0]
        rng = (min(rng[0], ch - 0.04 * span), max(rng[1], ch + 0.04 * span))
    for ax in list(axes.flat)[:len(panels)]:
        if rng:
            ax.set_ylim(*rng)
    for ax, x, v, c in ends:  # a diverged run: x at its last point, held inside the axis
        top = ax.get_ylim()[1]
        ax.plot(x, min(v, top) if math.isfinite(v) else top, "x", color=c, ms=9, mew=2.5, clip_on=False)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (nats)")
    extra = [(plt.Line2D([], [], color="gray", marker="x", ls="", ms=8, mew=2), "run(s) diverged")] if ends else []
    shared_legend(fig, axes, line_key, extra)
    suptitle(fig, figure_title(data, f"training loss per {line_key}", "line: mean over seeds, band: seed range"
                        + ("; y range: 1st–99th percentile" if rng else "")))
    fig.tight_layout()
    return save(fig, out / "loss_curves.png")


# ------------------------------------------------------------------------------------------ error bars
def errorbars(ax, x, means, cis, color, label=None, bounds: tuple[float, float] | None = None,
              positive: bool = False, **kw):
    """Means with 95% CI error bars. ``positive``: the quantity cannot be negative (times, steps), so the lower
    end is displayed clipped at 0 (the tables keep the symmetric t interval). ``bounds``: the axis range; a bar
    end beyond it is drawn to the edge and marked with a triangle. Returns whether any end was cut."""
    means, cis = np.asarray(means, float), np.nan_to_num(np.asarray(cis, float))
    lower = np.minimum(cis, means) if positive else cis
    ax.errorbar(x, means, yerr=[lower, cis], color=color, label=label, capsize=3, **kw)
    cut = False
    if bounds is not None:
        lo, hi = bounds
        for xi, m, c in zip(x, means, cis):
            if m + c > hi:
                ax.plot(xi, hi, "^", color=color, ms=5, clip_on=False)
                cut = True
            if m - c < lo and not positive:
                ax.plot(xi, lo, "v", color=color, ms=5, clip_on=False)
                cut = True
    return cut


def bounds_for(metric: str, lo: float, hi: float) -> tuple[float, float]:
    """y range from the data (means and CIs), kept inside the metric's natural range (accuracy in [0, 1])."""
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    if metric.endswith("acc"):
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return (max(lo, 0.0) if metric.endswith(("loss", "ppl")) else lo), hi


def dodge(i: int, n: int, log: bool = True) -> float:
    """Multiplicative x offset for line i of n, so error bars at the same x do not hide each other."""
    return 10 ** (0.015 * (i - (n - 1) / 2)) if log else 1.0


POSITIVE = ("steps_to_target", "time_to_target", "wall_time", "throughput", "train_loss_auc")


def bars(data: StudyData, summ, out: Path, what: list[tuple[str, str]], name: str, title: str) -> Path | None:
    """Bar chart(s) of summary columns with 95% CI error bars, one bar per configuration, labels that do not
    overlap (horizontal bars when the labels are long). Positive quantities: error bars clipped at 0."""
    if summ is None or not len(summ):
        return None
    what = [(c, lab) for c, lab in what if f"{c}_mean" in summ]
    if not what:
        return None
    labels = [config_label([r[c] for c in data.group_cols], data.group_cols) for _, r in summ.iterrows()]
    first = data.group_cols[0]
    look = styles(list(dict.fromkeys(summ[first])))
    n = len(labels)
    fig, axes = plt.subplots(1, len(what), figsize=(4.6 * len(what) + 1.0, 0.42 * n + 1.6), squeeze=False)
    y = np.arange(n)[::-1]  # first configuration on top
    for k, (ax, (c, lab)) in enumerate(zip(axes[0], what)):
        means = summ[f"{c}_mean"].astype(float).to_numpy()
        cis = np.nan_to_num(summ[f"{c}_ci95"].astype(float).to_numpy())
        positive = c in POSITIVE
        lower = np.minimum(cis, np.nan_to_num(means)) if positive else cis
        bars_ = ax.barh(y, np.nan_to_num(means), xerr=[lower, cis], capsize=3, height=0.65,
                        color=[look[v]["color"] for v in summ[first]], edgecolor="black", lw=0.5,
                        error_kw={"lw": 1.1})
        for bar, v in zip(bars_, summ[first]):
            bar.set_hatch(look[v]["hatch"])
        right = np.nanmax(np.where(np.isfinite(means), means + cis, 0)) if n else 1.0
        for i, (_, r) in enumerate(summ.iterrows()):
            if c in ("steps_to_target", "time_to_target"):
                note = f"{int(r.get('n_reached', 0) or 0)}/{int(r['n'])} reached"
            else:
                note = f"n={int(r['n']) - int(r['n_diverged']) - int(r.get('n_pruned', 0) or 0)}"
            end = (means[i] if math.isfinite(means[i]) else 0) + cis[i]
            ax.annotate(note if math.isfinite(means[i]) else "none reached" if "target" in c else "no value",
                        (max(end, 0), y[i]), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                        color="black" if math.isfinite(means[i]) else "red")
        metric = c.split("_", 1)[1].replace("_", "/", 1) if c.startswith(("final_", "best_")) else None
        ch = chance(data, metric) if metric else None
        if ch is not None:
            ax.axvline(ch, color="0.45", ls=":", lw=1.2, zorder=0)
        ax.set_yticks(y)
        ax.set_yticklabels(labels if k == 0 else [""] * n)
        ax.set_xlabel(lab + (" (error bar: 95% CI, shown ≥ 0)" if positive else " (error bar: 95% CI)")
                      + ("\ndotted line: chance (uniform prediction)" if ch is not None else ""))
        ax.set_xlim(left=min(0.0, float(np.nanmin(np.where(np.isfinite(means), means - lower, 0)))),
                    right=right * 1.25 if right > 0 else 1.0)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_ylabel(" / ".join(data.group_cols))
    suptitle(fig, figure_title(data, title, "mean ± 95% CI over seeds (n at each bar)"))
    fig.tight_layout()
    return save(fig, out / name)


# tick mantissas from the roundest set to the finest; log_ticks takes the first that puts 4+ ticks on the axis
TICK_TIERS = ((1, 2, 5), (1, 1.5, 2, 3, 5), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8),
              (1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9))


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round tick values in [lo, hi] (0 < lo < hi) for a log axis spanning less than a decade, where
    matplotlib's log locators leave stretches without a tick: the roundest mantissa set of TICK_TIERS (times
    powers of ten) with at least 4 values in range; plain linear steps for a range too narrow for any."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for tier in TICK_TIERS:
        ticks = sorted(float(f"{m * 10.0 ** e:.6g}") for e in decades for m in tier)
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) < 3:  # a narrow range is nearly linear on a log axis: plain round steps
        ticks = [float(f"{t:.6g}") for t in matplotlib.ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
                 .tick_values(lo, hi) if lo <= t <= hi]
    return ticks
