"""The numbers of a report: per-configuration means with 95% CIs, and each study kind's own measures.

Definitions (also printed at the top of ``summary.md``):

* Statistics are over seeds: one configuration = one value of every swept axis except ``seed``. Mean ± the
  half-width of the 95% confidence interval, t(0.975, n-1) * s / sqrt(n). Diverged and pruned runs are left
  out of every mean (their count is given); steps/time-to-target are averaged over the runs that reached the
  target (``n_reached`` of ``n``).
* ``lr_sensitivity``: m(lr) is the mean over non-diverged seeds of the study metric at a grid LR. The best LR l*
  is the LR with the best m among the LRs at which no seed diverged. An LR is *usable* when no seed diverged
  at it and m(lr) is within ``tolerance`` of m(l*) (at least m(l*) - tol when maximizing, at most m(l*) + tol
  when minimizing; tol is in the metric's units, or tol * |m(l*)| with ``tolerance_relative: true``). The
  usable range [lo, hi] is the longest run of consecutive grid LRs that contains l* and is usable throughout;
  its width is log10(hi / lo) decades: 0 when only l* is usable, a lower bound set by the grid's spacing.
* ``batch_size``: m(batch size) per norm, with the LR rule (none: same LR; linear: lr * B / B0;
  sqrt: lr * sqrt(B / B0)) and the budget (same samples: steps = samples / B; or same steps) applied in each
  trial's config; ``spread`` = largest minus smallest m over the batch sizes.
* ``convergence``: steps-to-target is the first validation step at which the target metric reaches the target
  value (so its resolution is ``trainer.val_every``); time-to-target the wall-clock seconds of training until
  then; train-loss AUC the mean training loss over all steps of the run (area under the curve / steps; lower =
  faster convergence).
* ``search``: per group (e.g. per norm), the trial with the best objective and its hyperparameters.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .data import StudyData, col, metric_columns
from .stats import fmt_ci, mean_ci

DEFINITIONS = __doc__.split("Definitions (also printed at the top of ``summary.md``):", 1)[1].strip()


def _ok(sub: pd.DataFrame) -> pd.DataFrame:
    return sub[(~sub["diverged"].astype(bool)) & (sub["state"] == "complete")]


def _groups(df: pd.DataFrame, cols: list[str]):
    if not len(df):
        return
    yield from df.groupby(cols, sort=False, dropna=False)


def summary(data: StudyData) -> pd.DataFrame:
    """One row per configuration: n, n_diverged, n_pruned, and ``<metric>_mean`` / ``<metric>_ci95`` of every
    measurement (means over non-diverged, non-pruned seeds)."""
    df, cols = data.trials, data.group_cols
    out = []
    for key, sub in _groups(df, cols):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(cols, key))
        ok = _ok(sub)
        row.update(n=len(sub), n_diverged=int(sub["diverged"].astype(bool).sum()),
                   n_pruned=int((sub["state"] == "pruned").sum()))
        for c in metric_columns(df):
            m, ci, n = mean_ci(ok[c].tolist())
            row[f"{c}_mean"], row[f"{c}_ci95"] = m, ci
            if c == "steps_to_target":
                row["n_reached"] = n
        out.append(row)
    return pd.DataFrame(out)


def _cell(s: pd.DataFrame, metric: str) -> tuple[float, float, int, int, str]:
    """One axis value's trials: mean, CI half-width, finished count, diverged count, and the table text
    ("diverged" when all diverged, else "mean ± ci" with "[k/n diverged]" when some did)."""
    m, ci, n = mean_ci(_ok(s)[metric].tolist() if metric in s else [])
    nd = int(s["diverged"].astype(bool).sum())
    text = "diverged" if nd == len(s) else fmt_ci(m, ci) + (f" [{nd}/{len(s)} diverged]" if nd else "")
    return m, ci, n, nd, text


def _better(direction: str):
    return (lambda a, b: a > b) if direction == "maximize" else (lambda a, b: a < b)


def lr_sensitivity(data: StudyData) -> pd.DataFrame:
    """Per norm (and any other non-LR axis): best LR, metric at each LR, diverged LRs, usable-range width."""
    spec, df = data.spec, data.trials
    metric = col(spec.metric, spec.metric_at)
    better = _better(spec.direction)
    tol, rel = spec.options.get("tolerance", 0.0), spec.options.get("tolerance_relative", False)
    cols = [c for c in data.group_cols if c != "lr"]
    out = []
    for key, sub in _groups(df, cols):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(cols, key))
        per_lr = []
        for lr, s in sorted(sub.groupby("lr"), key=lambda kv: float(kv[0])):
            m, ci, n, nd, _ = _cell(s, metric)
            per_lr.append({"lr": float(lr), "mean": m, "ci95": ci, "n": len(s), "n_ok": n, "n_diverged": nd})
        stable = [p for p in per_lr if p["n_diverged"] == 0 and p["n_ok"] > 0 and math.isfinite(p["mean"])]
        best = None
        for p in stable:
            if best is None or better(p["mean"], best["mean"]):
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
        for lr, s in sorted(sub.groupby("lr"), key=lambda kv: float(kv[0])):
            row[f"lr={float(lr):g}"] = _cell(s, metric)[4]
        row["_per_lr"] = per_lr
        out.append(row)
    return pd.DataFrame(out)


def batch_size(data: StudyData) -> pd.DataFrame:
    spec, df = data.spec, data.trials
    metric = col(spec.metric, spec.metric_at)
    cols = [c for c in data.group_cols if c != "batch_size"]
    out = []
    for key, sub in _groups(df, cols):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(cols, key))
        means = []
        for bs, s in sorted(sub.groupby("batch_size"), key=lambda kv: int(kv[0])):
            m, _, _, _, text = _cell(s, metric)
            row[f"bs={int(bs)}"] = text + f" (lr {s['lr_used'].iloc[0]:.3g})"
            if math.isfinite(m):
                means.append(m)
        row["spread"] = max(means) - min(means) if means else None
        out.append(row)
    return pd.DataFrame(out)


def convergence(data: StudyData, summ: pd.DataFrame) -> pd.DataFrame:
    metric = col(data.spec.metric, data.spec.metric_at)
    out = []
    for _, r in summ.iterrows():
        row = {c: r[c] for c in data.group_cols}
        row["reached"] = f"{int(r.get('n_reached', 0) or 0)}/{int(r['n'])}"
        for c in ("steps_to_target", "time_to_target", "train_loss_auc", metric):
            row[c] = fmt_ci(r.get(f"{c}_mean", math.nan), r.get(f"{c}_ci95", math.nan))
        out.append(row)
    return pd.DataFrame(out)


def search_best(data: StudyData) -> pd.DataFrame:
    df, spec = data.trials, data.spec
    better = _better(spec.direction)
    out = []
    for g, sub in _groups(df, ["group"]):
        g = g[0] if isinstance(g, tuple) else g
        ok = _ok(sub)
        best = None
        for _, r in ok.iterrows():
            v = r["value"]
            if v is not None and math.isfinite(v) and (best is None or better(v, best["value"])):
                best = r
        row: dict[str, Any] = {"group": g, "n": len(sub), "n_diverged": int(sub["diverged"].astype(bool).sum()),
                               "n_pruned": int((sub["state"] == "pruned").sum())}
        row["best_value"] = best["value"] if best is not None else None
        row["best_trial"] = int(best["trial"]) if best is not None else None
        for c in [c for c in df.columns if c.startswith("param_")]:
            row[c[len("param_"):]] = best[c] if best is not None else None
        row["run_dir"] = best["run_dir"] if best is not None else None
        out.append(row)
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-markdown table (no 'tabulate' dependency)."""
    if df is None or not len(df):
        return "_(no finished trials)_\n"

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|")

    cols = [c for c in df.columns if not str(c).startswith("_")]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(cell(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def compact_summary(data: StudyData, summ: pd.DataFrame) -> pd.DataFrame:
    """The summary's key columns as "mean ± CI" strings, for summary.md (the CSV has every column)."""
    spec = data.spec
    keys = [col(spec.metric, "final"), col(spec.metric, "best"), col("val/loss", "final"), "train_loss_auc"]
    if spec.kind == "convergence":
        keys += ["steps_to_target", "time_to_target"]
    keys += ["wall_time", "throughput"]
    unit = "tokens" if "task" in data.trials and (data.trials["task"] == "lm").any() else "samples"
    out = []
    for _, r in summ.iterrows():
        row = {c: r[c] for c in data.group_cols}
        row.update(n=int(r["n"]), diverged=int(r["n_diverged"]))
        if r.get("n_pruned"):
            row["pruned"] = int(r["n_pruned"])
        units = {"wall_time": "wall time (s)", "throughput": f"throughput ({unit}/s)",
                 "steps_to_target": "steps to target", "time_to_target": "time to target (s)",
                 "train_loss_auc": "train-loss AUC"}
        for k in dict.fromkeys(keys):
            if f"{k}_mean" in r:
                row[units.get(k, k.replace("_val_", " val/"))] = fmt_ci(r[f"{k}_mean"], r[f"{k}_ci95"])
        out.append(row)
    return pd.DataFrame(out)
