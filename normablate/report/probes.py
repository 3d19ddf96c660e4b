"""The report's landscape and ICS views (Santurkar et al. 2018, Figs. 4 and 5) for studies whose runs probed.

Per norm over training steps, one row of panels per value of the other configuration columns (e.g. per LR):
loss variation (the range of the loss along the gradient over the step-size grid), gradient predictiveness and
effective beta-smoothness (log scale), and ICS per layer (l2 distance and cosine of G and G'). In every panel the
line is the mean over seeds and the band the seed range (one meaning per figure); where the loss-variation
panel's robust y range cuts a band, triangles at the edge mark it, as on the report's other figures.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..analysis.data import StudyData, mask_for
from ..studies.base import Section

DEFINITION = """\
* Probes (runs with ``probes.enabled``; every ``probes.every`` steps, on the training batch, training unchanged):
  *loss variation* = the range of L(x - eta g) over the step-size grid (multiples of the current LR);
  *gradient predictiveness* = max over the grid of ||grad L(x) - grad L(x - eta g)||; *effective
  beta-smoothness* = max over the grid of that change divided by ||eta g||; *ICS* of a layer = ||G - G'|| and
  cos(G, G'), G its gradient, G' its gradient after every earlier layer took the optimizer's actual update
  (Santurkar et al. 2018, Def. 2.1). Lower variation, predictiveness change and beta mean a smoother landscape.
  Table values are each run's mean over its probed steps, then mean ± 95% CI over seeds; the ICS layer mean
  leaves out a layer with no earlier layer (the first), whose ICS is 0 by construction."""

MEASURES = [("probe/loss_range", "loss variation (range over step sizes, nats)", "minimize"),
            ("probe/grad_pred", "gradient predictiveness: max ||∇L(x) − ∇L(x − ηg)||", "minimize"),
            ("probe/beta", "effective β-smoothness: max ||Δ∇L|| / ||ηg||", "minimize")]


COLUMNS = [("probe/loss_range", "loss variation"), ("probe/grad_pred", "grad. predictiveness"),
           ("probe/beta", "β-smoothness"), ("ics_l2", "ICS l2 (layer mean)"), ("ics_cos", "ICS cos (layer mean)")]
CONCLUDE = [("probe/loss_range", "loss variation", "minimize"), ("probe/grad_pred", "gradient predictiveness", "minimize"),
            ("probe/beta", "effective β-smoothness", "minimize"), ("ics_cos", "ICS cosine (1 = no shift)", "maximize")]


def _run_mean(hist: dict, key: str) -> float:
    vals = [v for _, v in hist.get(key, []) if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def layers_of(data: StudyData) -> list[str]:
    return [k[len("probe/ics_l2/"):] for k in data.history_keys("probe/ics_l2/")]


def section(data: StudyData, out: Path) -> Section:
    if not data.history_keys("probe/"):
        return Section()
    bstats = batchstats_section(data)  # probes.batchstats: its own table (tables only, no figure)
    if not data.history_keys("probe/loss_range") and not layers_of(data):
        return bstats  # batch statistics probed alone (probes.landscape and probes.ics off)
    sec = _landscape_section(data, out)
    return Section(sec.markdown + ("\n" + bstats.markdown if bstats.markdown else ""), sec.figures,
                   {**sec.tables, **bstats.tables})


def _landscape_section(data: StudyData, out: Path) -> Section:
    import pandas as pd

    from ..analysis.tables import conclusion, markdown_table
    from ..analysis.stats import fmt_ci, mean_ci

    df = data.trials
    probed = layers_of(data)
    layers = [n for n in probed if n not in trivial_layers(data, probed)]  # the layer mean's
    per_run = pd.DataFrame({"row": range(len(df))})
    for key, _, _ in MEASURES:
        per_run[key] = [_run_mean(data.histories.get(i, {}), key) for i in range(len(df))]
    per_run["ics_l2"] = [np.nanmean([_run_mean(data.histories.get(i, {}), f"probe/ics_l2/{n}") for n in layers])
                         if layers else math.nan for i in range(len(df))]
    per_run["ics_cos"] = [np.nanmean([_run_mean(data.histories.get(i, {}), f"probe/ics_cos/{n}") for n in layers])
                          if layers else math.nan for i in range(len(df))]
    ok = (~df["diverged"].astype(bool)) & (df["state"] == "complete")
    rows, numeric = [], []
    cols = data.group_cols
    panel_cols = [c for c in cols if c != data.line_key]
    # per panel (e.g. per LR) and measure: line (norm) -> each run's mean of that measure
    per_panel: dict[tuple, dict[str, dict[str, list]]] = {}
    for key, sub in df.groupby(cols, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        idx = [i for i in sub.index if ok.iloc[i]]
        row = dict(zip(cols, key))
        row["n"] = len(idx)
        num = dict(row)
        panel = tuple(row[c] for c in panel_cols)
        for c, name in COLUMNS:
            m, ci, _ = mean_ci(per_run.loc[idx, c].tolist())
            row[name] = fmt_ci(m, ci)
            num[f"{c}_mean"], num[f"{c}_ci95"] = m, ci
            per_panel.setdefault(panel, {}).setdefault(c, {})[str(row[data.line_key])] = per_run.loc[idx, c].tolist()
        rows.append(row)
        numeric.append(num)
    lines = []
    for panel, measures in per_panel.items():
        where = ", ".join(f"{c}={v}" for c, v in zip(panel_cols, panel))
        for c, what, direction in CONCLUDE:
            text = conclusion(measures[c], direction, what)
            lines.append(text.replace("**Conclusion:**", f"**Conclusion ({where}):**" if where else "**Conclusion:**"))
    md = ("## Loss landscape and internal covariate shift (probes)\n\n" + markdown_table(pd.DataFrame(rows)) + "\n"
          + "\n\n".join(lines) + "\n\nLower loss variation, gradient change and β mean a smoother landscape, but "
          "read them with the loss: a network that does not train (e.g. a deep plain net stuck at chance, with "
          "vanishing gradients) is flat too. ICS l2 scales with the gradient's size; the cosine does not. "
          "Numbers: `probes.csv` (this table), `probes_per_run.csv` (each run's means).\n")
    runs = pd.concat([df[["trial", *cols, "seed"] if "seed" not in cols and "seed" in df else ["trial", *cols]]
                      .reset_index(drop=True), per_run.drop(columns=["row"])], axis=1)[ok.to_numpy()]
    tables = {"probes.csv": pd.DataFrame(numeric), "probes_per_run.csv": runs}
    figures = [("Loss landscape along the gradient", landscape_figure(data, out))]
    if probed:
        figures.append(("Internal covariate shift per layer", ics_figure(data, out, probed)))
    return Section(md, figures, tables)


def _panels(data: StudyData):
    from ..analysis.plots import panels_of

    return panels_of(data, (data.line_key,))


def landscape_figure(data: StudyData, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from ..analysis import plots as P

    df = data.trials
    panel_cols, panels = _panels(data)
    names = list(dict.fromkeys(df[data.line_key]))
    look = P.styles(names)
    fig, axes = plt.subplots(len(panels), 3, figsize=(13.5, 3.3 * len(panels) + 0.8), squeeze=False)
    any_cut = False
    for r, panel in enumerate(panels):
        m = mask_for(df, panel_cols, panel)
        drawn = []  # (x, band low, band high, colour) of the loss-variation panel, for the cut marks
        for name in names:
            rows = [i for i in df.index[m & (df[data.line_key] == name).to_numpy()]]
            for c, (key, _, _) in enumerate(MEASURES):
                res = P.line_with_band(axes[r][c], data.curves(rows, key), look[name]["color"], name,
                                       ls=look[name]["ls"])
                if c == 0 and res is not None:
                    drawn.append((res[0], res[2], res[3], look[name]["color"]))
        where = ", ".join(f"{c}={P.fmt(v)}" for c, v in zip(panel_cols, panel))
        titles = ["loss variation along −∇L", "gradient predictiveness", "effective β-smoothness"]
        ylabels = ["max − min of L(x − ηg) over η (nats)", "max ||∇L(x) − ∇L(x − ηg)|| (log)",
                   "max ||Δ∇L|| / ||ηg|| (log)"]
        for c in range(3):
            ax = axes[r][c]
            ax.set_title(titles[c] + (f" ({where})" if where else ""))
            ax.set_ylabel(ylabels[c])
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if c and ax.has_data():
                ax.set_yscale("log")
        lim = P.robust_range([v for x, lo, hi, _ in drawn for v in (lo, hi)], floor=0.0)
        if lim:
            axes[r][0].set_ylim(*lim)
            for x, lo, hi, color in drawn:
                any_cut |= P.mark_clipped(axes[r][0], x, lo, hi, color, lim)
    extra = [(plt.Line2D([], [], color="gray", marker=P.CLIP_HANDLE[0], ls="", ms=6), P.CLIP_HANDLE[1])] \
        if any_cut else []
    P.shared_legend(fig, axes, data.line_key, extra)
    P.suptitle(fig, P.figure_title(data, f"loss landscape along the gradient (step sizes {_grid_text(data)})",
                                   "line: mean over seeds, band: seed range (every panel); left: y range 1st–99th "
                                   "percentile"), fontsize=10)
    fig.tight_layout()
    return P.save(fig, out / "probe_landscape.png")


def _grid_text(data: StudyData) -> str:
    """The step-size grid the runs used (from the first trial's config)."""
    cfg = next((c for c in data.trials.get("probe_cfg", []) if c), None) or {}
    sizes = cfg.get("step_sizes") or [0.5, 1, 2, 4]
    return ", ".join(f"{s:g}" for s in sizes) + (" × LR" if cfg.get("relative_to_lr", True) else "")


def trivial_layers(data: StudyData, layers: list[str]) -> list[str]:
    """Layers with no earlier layers (the first): ICS 0 and cosine 1 by definition (every recorded ICS exactly 0).
    Not drawn (said in the figure's title) and left out of the layer means (``measures.ics_layers``, the same rule)."""
    return [n for n in layers if all(v == 0.0 for c in data.curves(range(len(data.trials)), f"probe/ics_l2/{n}")
                                     for _, v in c)]


def ics_figure(data: StudyData, out: Path, layers: list[str], max_layers: int = 6) -> Path | None:
    import matplotlib.pyplot as plt

    from ..analysis import plots as P

    trivial = trivial_layers(data, layers)
    rest = [n for n in layers if n not in trivial] or layers
    if len(rest) > max_layers:  # evenly spaced, first and last included
        pick = sorted({round(i * (len(rest) - 1) / (max_layers - 1)) for i in range(max_layers)})
        shown = [rest[i] for i in pick]
    else:
        shown = rest
    df = data.trials
    panel_cols, panels = _panels(data)
    names = list(dict.fromkeys(df[data.line_key]))
    look = P.styles(names)
    nrow = 2 * len(panels)
    fig, axes = plt.subplots(nrow, len(shown), figsize=(3.1 * len(shown) + 1.4, 2.6 * nrow + 0.9), squeeze=False,
                             sharex=True)
    for p, panel in enumerate(panels):
        m = mask_for(df, panel_cols, panel)
        where = ", ".join(f"{c}={P.fmt(v)}" for c, v in zip(panel_cols, panel))
        for j, layer in enumerate(shown):
            for name in names:
                rows = [i for i in df.index[m & (df[data.line_key] == name).to_numpy()]]
                for ax, key in ((axes[2 * p][j], "ics_l2"), (axes[2 * p + 1][j], "ics_cos")):
                    P.line_with_band(ax, data.curves(rows, f"probe/{key}/{layer}"), look[name]["color"], name,
                                     ls=look[name]["ls"])
            axes[2 * p][j].set_title(f"{layer}" + (f"\n{where}" if where else ""), fontsize=9)
            cos_ax = axes[2 * p + 1][j]
            lows = [float(np.nanmin(ln.get_ydata())) for ln in cos_ax.get_lines()] + \
                [float(np.nanmin(c.get_paths()[0].vertices[:, 1])) for c in cos_ax.collections if c.get_paths()]
            cos_ax.set_ylim(max(-1.05, min(lows + [0.9]) - 0.05), 1.02)
            cos_ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
            for ax in (axes[2 * p][j], axes[2 * p + 1][j]):
                ax.grid(alpha=0.3)
        axes[2 * p][0].set_ylabel("ICS: ||G − G′||₂")
        axes[2 * p + 1][0].set_ylabel("cos(G, G′)")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    P.shared_legend(fig, axes, data.line_key)
    note = f" (layers {', '.join(shown)} of {len(layers)} probed)" if len(shown) < len(layers) else ""
    if trivial:
        note += f"; {', '.join(trivial)}: no earlier layer, ICS 0 by definition (not drawn)"
    P.suptitle(fig, P.figure_title(data, f"internal covariate shift per layer (Santurkar et al. Def. 2.1){note}",
                                   "line: mean over seeds, band: seed range; cos = 1: no shift"), fontsize=10)
    fig.tight_layout()
    return P.save(fig, out / "probe_ics.png")


# ------------------------------------------------------------------------------------------ batch statistics
BSTAT_COLUMNS = [("mean_dist", "|μ_B − μ| / σ"), ("var_dist", "|σ²_B − σ²| / σ²"), ("grad_mean", "‖∂L/∂μ_B‖"),
                 ("grad_var", "‖∂L/∂σ²_B‖"), ("grad_mean_cv", "‖∂L/∂μ_B‖ step CV"),
                 ("grad_var_cv", "‖∂L/∂σ²_B‖ step CV")]

BSTAT_DEFINITION = """\
* Batch statistics (runs with ``probes.batchstats``; Shen et al. 2020, Figs. 2-3; every ``probes.every`` steps on
  the training batch, training unchanged), per BN-family layer: |μ_B − μ| / σ and |σ²_B − σ²| / σ² = the batch
  mean's and variance's distance from the running ones (mean over channels; masked_bn: real tokens only;
  powernorm: its quadratic mean ψ²_B against the running ψ², no mean statistic); ‖∂L/∂μ_B‖, ‖∂L/∂σ²_B‖ = the
  gradient norms of the loss w.r.t. the batch statistics (powernorm: ∂L/∂ψ²_B, 0 after its warm-up, when its
  forward uses the running ψ). Each run: the layer mean of each layer's mean over probed steps; *step CV* = the
  standard deviation over probed steps of the layer-mean gradient norm divided by its mean (how much it
  fluctuates from step to step). Table: mean ± 95% CI over seeds."""


def definitions(data: StudyData) -> list[str]:
    """The definitions of what the runs probed: landscape/ICS, batch statistics, or both."""
    out = [DEFINITION] if data.history_keys("probe/loss_range") or layers_of(data) else []
    return out + ([BSTAT_DEFINITION] if data.history_keys("probe/bstat_") else [])


def _bstat_series(hist: dict, measure: str) -> dict[int, float]:
    """Step -> the mean over layers of ``probe/bstat_<measure>/<layer>`` at that step."""
    per_step: dict[int, list[float]] = {}
    for k, pts in hist.items():
        if k.startswith(f"probe/bstat_{measure}/"):
            for step, v in pts:
                if v is not None and math.isfinite(v):
                    per_step.setdefault(int(step), []).append(float(v))
    return {s: sum(v) / len(v) for s, v in sorted(per_step.items())}


def _bstat_run(hist: dict) -> dict[str, float]:
    out = {}
    for key in ("mean_dist", "var_dist", "grad_mean", "grad_var"):
        layers = [k for k in hist if k.startswith(f"probe/bstat_{key}/")]
        out[key] = float(np.mean([_run_mean(hist, k) for k in layers])) if layers else math.nan
    for key in ("grad_mean", "grad_var"):
        vals = list(_bstat_series(hist, key).values())
        m = float(np.mean(vals)) if vals else math.nan
        out[f"{key}_cv"] = float(np.std(vals, ddof=1)) / m if len(vals) > 1 and m > 0 else math.nan
    return out


def batchstats_section(data: StudyData) -> Section:
    """The batch-statistics table (``probes_batchstats.csv``) and each run's numbers, per layer too
    (``probes_batchstats_per_run.csv``); empty when no run probed batch statistics."""
    if not data.history_keys("probe/bstat_"):
        return Section()
    import pandas as pd

    from ..analysis.stats import fmt_ci, mean_ci
    from ..analysis.tables import markdown_table

    df = data.trials
    ok = (~df["diverged"].astype(bool)) & (df["state"] == "complete")
    per_run = [_bstat_run(data.histories.get(i, {})) for i in range(len(df))]
    cols = data.group_cols
    rows, numeric = [], []
    for key, sub in df.groupby(cols, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        idx = [i for i in sub.index if ok.iloc[i]]
        row = {**dict(zip(cols, key)), "n": len(idx)}
        num = dict(row)
        for c, name in BSTAT_COLUMNS:
            m, ci, _ = mean_ci([per_run[i][c] for i in idx])
            row[name] = fmt_ci(m, ci)
            num[f"{c}_mean"], num[f"{c}_ci95"] = m, ci
        rows.append(row)
        numeric.append(num)
    layer_keys = data.history_keys("probe/bstat_")
    runs = []
    for i in range(len(df)):
        if not ok.iloc[i]:
            continue
        hist = data.histories.get(i, {})
        base = {"trial": df["trial"].iloc[i], **{c: df[c].iloc[i] for c in cols}}
        if "seed" in df and "seed" not in cols:
            base["seed"] = df["seed"].iloc[i]
        runs.append({**base, "layer": "(layer mean)", **per_run[i]})
        for k in layer_keys:  # probe/bstat_<measure>/<layer>
            if k in hist:
                measure, layer = k[len("probe/bstat_"):].split("/", 1)
                runs.append({**base, "layer": layer, measure: _run_mean(hist, k)})
    per_layer = pd.DataFrame(runs)
    if len(per_layer):  # one row per (run, layer)
        keys = [c for c in per_layer.columns if c not in {m for m, _ in BSTAT_COLUMNS}]
        per_layer = per_layer.groupby(keys, sort=False, dropna=False).first().reset_index()
    md = ("## Batch-statistics fluctuation (probes, Shen et al. 2020)\n\n" + markdown_table(pd.DataFrame(rows))
          + "\nLarger distances and gradient norms mean batch statistics that fluctuate more (their claim: BN on "
          "text, more than on images; PowerNorm's forward uses running statistics instead). Norms without batch "
          "statistics (ln, rms, dyt, none) have no row values. Numbers: `probes_batchstats.csv` (this table), "
          "`probes_batchstats_per_run.csv` (each run, layer mean and per layer).\n")
    return Section(md, [], {"probes_batchstats.csv": pd.DataFrame(numeric),
                            "probes_batchstats_per_run.csv": per_layer})
