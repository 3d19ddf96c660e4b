"""Tables of a study: one row per configuration (mean ± 95% CI over seeds), markdown, and comparisons.

Common definitions (printed in ``summary.md``; each study kind adds its own):
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .data import StudyData, groups, metric_columns, ok_rows
from .stats import Difference, fmt_ci, mean_ci, welch

DEFINITIONS = """\
* Statistics are over seeds: one configuration = one value of every swept axis except ``seed``. Mean ± the
  half-width of the 95% confidence interval, t(0.975, n-1) * s / sqrt(n). Diverged and pruned runs are left
  out of every mean (their count is given); steps/time-to-target are averaged over the runs that reached the
  target (``n_reached`` of ``n``). An accuracy cell also counts the runs, diverged ones included (tested as they
  stopped), that end *at chance*: at most 1 point above 1 / number of classes ("[1/3 diverged; 3/3 at chance]").
* Exploratory comparisons (the line under each table, and the headline): Welch's t-test of the difference
  between the best configuration's mean and each other's (unequal variances, Welch-Satterthwaite df); the
  difference is called clear when its 95% CI excludes 0 (p < 0.05). They were not stated before the study ran
  and carry no correction for multiple comparisons: with many configurations, read a single p near 0.05 with
  caution; only the verdicts of pre-registered hypotheses are confirmatory."""


def better(direction: str):
    return (lambda a, b: a > b) if direction == "maximize" else (lambda a, b: a < b)


def study_task(data: StudyData):
    """The facts (``tasks.TaskInfo``) of the one registered task the study's trials recorded (a study runs one:
    ``SweepSpec.validate_all``); None when they record none, an unregistered one or several."""
    from .. import tasks

    names = set(data.trials["task"].dropna()) if "task" in data.trials else set()
    return tasks.get(names.pop()) if len(names) == 1 and next(iter(names)) in tasks.REGISTRY else None


def summary(data: StudyData) -> pd.DataFrame:
    """One row per configuration: n, n_diverged, n_pruned, and ``<metric>_mean`` / ``<metric>_ci95`` of every
    measurement (means over non-diverged, non-pruned seeds)."""
    df, cols = data.trials, data.group_cols
    out = []
    for key, sub in groups(df, cols):
        row: dict[str, Any] = dict(zip(cols, key))
        ok = ok_rows(sub)
        row.update(n=len(sub), n_diverged=int(sub["diverged"].astype(bool).sum()),
                   n_pruned=int((sub["state"] == "pruned").sum()))
        for c in metric_columns(df):
            m, ci, n = mean_ci(ok[c].tolist())
            row[f"{c}_mean"], row[f"{c}_ci95"] = m, ci
            if c == "steps_to_target":
                row["n_reached"] = n
        out.append(row)
    return pd.DataFrame(out)


CHANCE_MARGIN = 0.01  # an accuracy at most 1 point above 1 / num_classes counts as "at chance"
KNOWN_CLASSES = {"synthetic": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}


def classes(recorded, source) -> int | None:
    """A trial's number of classes: the one it recorded (runs from 2026-12-06 on), else the class count of its data
    source when the source's name (a hub name or a local folder's last part, e.g. ``../shared/data/cifar10``) is a
    known dataset's; None when neither tells. The report's chance line and its "at chance" count share this rule."""
    try:
        n = int(recorded)
    except (TypeError, ValueError, OverflowError):  # None, NaN, inf: not recorded
        n = 0
    if n > 0:
        return n
    if source is None or (isinstance(source, float) and math.isnan(source)):
        return None
    return KNOWN_CLASSES.get(Path(str(source).rstrip("/")).name.lower())


def trial_classes(df: pd.DataFrame) -> list[int | None]:
    """Each trial's number of classes (``classes``, from its ``num_classes`` and ``source`` columns)."""
    def column(c: str):
        return df[c] if c in df else [None] * len(df)
    return [classes(n, src) for n, src in zip(column("num_classes"), column("source"))]


def at_chance(s: pd.DataFrame, metric: str) -> int | None:
    """How many of the trials ``s`` (diverged ones too: a diverged run is tested as it stopped) end with an
    accuracy ``metric`` at chance, at most ``CHANCE_MARGIN`` above 1 / their number of classes (``classes``);
    None for a metric that is no accuracy or trials whose number of classes is unknown."""
    if not metric.endswith("acc") or metric not in s:
        return None
    done = s[s["state"] == "complete"] if "state" in s else s
    k = trial_classes(done)
    if not k or None in k:
        return None
    chance = 1.0 / pd.Series(k, index=done.index, dtype=float)
    return int((pd.to_numeric(done[metric], errors="coerce") <= chance + CHANCE_MARGIN).sum())


def cell(s: pd.DataFrame, metric: str) -> tuple[float, float, int, int, str]:
    """One axis value's trials: mean, CI half-width, finished count, diverged count, and the table text
    ("diverged" when all diverged, else "mean ± ci" with "[k/n diverged]" when some did), with "k/n at chance"
    added for an accuracy where some trials, diverged or not, end at chance (``at_chance``): a mean over the
    non-diverged runs alone would hide that the diverged ones ended there too."""
    m, ci, n = mean_ci(ok_rows(s)[metric].tolist() if metric in s else [])
    nd = int(s["diverged"].astype(bool).sum())
    k = at_chance(s, metric)
    chance = f"{k}/{len(s)} at chance" if k else ""
    if nd == len(s):
        text = "diverged" + (f" [{chance}]" if chance else "")
    else:
        notes = [x for x in (f"{nd}/{len(s)} diverged" if nd else "", chance) if x]
        text = fmt_ci(m, ci) + (f" [{'; '.join(notes)}]" if notes else "")
    return m, ci, n, nd, text


def config_label(values, cols) -> str:
    """How a configuration is named in tables, conclusions and legends: its value alone when one column tells the
    configurations apart (``bn``), else ``key=value`` pairs (``norm=bn ffn_norm=None``), so that two axes with
    the same values (a block norm and an FFN norm) are never read as one. (Space-separated: conclusions list
    configurations with commas.)"""
    values, cols = list(values), list(cols)
    if len(cols) == 1:
        return fmt(values[0])
    return " ".join(f"{c}={fmt(v)}" for c, v in zip(cols, values, strict=True))


def fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def config_values(data: StudyData, column: str) -> dict[str, list[float]]:
    """Per configuration (label of its group columns): the finished, non-diverged trials' values of ``column``."""
    out: dict[str, list[float]] = {}
    for key, sub in groups(data.trials, data.group_cols):
        ok = ok_rows(sub)
        out[config_label(key, data.group_cols)] = ok[column].tolist() if column in ok else []
    return out


def compare_to_best(values: dict[str, list[float]], direction: str) -> tuple[str | None, dict[str, Difference]]:
    """The configuration with the best mean (over >= 1 finite value) and Welch's test of best - each other."""
    means = {k: mean_ci(v) for k, v in values.items()}
    means = {k: m for k, m in means.items() if m[2] > 0 and math.isfinite(m[0])}
    if not means:
        return None, {}
    best = None
    for k, (m, _, _) in means.items():
        if best is None or better(direction)(m, means[best][0]):
            best = k
    return best, {k: welch(values[best], values[k]) for k in means if k != best}


def _num(x: float) -> str:
    return f"{x:.3g}"


def conclusion(values: dict[str, list[float]], direction: str, what: str) -> str:
    """One line: which configuration is best in ``what`` and, against each other, whether the difference is clear
    (Welch 95% CI of best - other, and p)."""
    best, diffs = compare_to_best(values, direction)
    if best is None:
        return f"**Conclusion:** (exploratory) no finished runs to compare ({what})."
    m, ci, n = mean_ci(values[best])
    word = "highest" if direction == "maximize" else "lowest"
    head = f"**Conclusion:** (exploratory) {best} has the {word} {what} ({fmt_ci(m, ci)}, n={n})"
    if not diffs:
        return head + "; nothing to compare it with."
    clear = [k for k, d in diffs.items() if d.clear]
    unclear = [k for k, d in diffs.items() if not d.clear]
    parts = []
    for k, d in diffs.items():
        if math.isfinite(d.ci95):
            parts.append(f"vs {k}: {d.diff:+.3g} [95% CI {_num(d.lo)}, {_num(d.hi)}], p={d.p:.2g}")
        else:
            parts.append(f"vs {k}: {d.diff:+.3g} (too few seeds for a CI)")
    verdict = []
    if clear:
        verdict.append(f"clearly {'better' if direction == 'maximize' else 'lower'} than {', '.join(clear)}")
    if unclear:
        verdict.append(f"no clear difference from {', '.join(unclear)}")
    return head + "; " + " and ".join(verdict) + " (Welch: " + "; ".join(parts) + ")."


def headline(values: dict[str, list[float]], direction: str, what: str) -> str:
    """One sentence: the main effect (best vs the runner-up) with its 95% CI, or 'no clear difference'."""
    best, diffs = compare_to_best(values, direction)
    if best is None:
        return f"No finished runs yet, so nothing can be said about {what}."
    m, ci, n = mean_ci(values[best])
    if not diffs:
        return f"Only {best} finished ({what} {fmt_ci(m, ci)}, n={n}); there is nothing to compare."
    means = {k: mean_ci(values[k])[0] for k in diffs}
    runner = max(means, key=means.get) if direction == "maximize" else min(means, key=means.get)
    d = diffs[runner]
    word = "higher" if direction == "maximize" else "lower"
    if not math.isfinite(d.ci95):
        return (f"{best} has the best {what} ({fmt_ci(m, ci)}), {abs(d.diff):.3g} {word} than the runner-up "
                f"{runner}, but with fewer than 2 seeds on a side there is no CI: no clear difference shown.")
    ci_txt = f"95% CI {_num(d.lo)} to {_num(d.hi)}, Welch p={d.p:.2g}, n={d.n_a} vs {d.n_b} seeds"
    if d.clear:
        worst = [k for k, x in diffs.items() if x.clear]
        extra = f"; it is also clearly {word} than {', '.join(k for k in worst if k != runner)}" \
            if len(worst) > 1 else ""
        return f"{best} gives the {'highest' if direction == 'maximize' else 'lowest'} {what}, {d.diff:+.3g} vs " \
               f"the runner-up {runner} ({ci_txt}){extra}."
    return (f"No clear difference between {best} and the runner-up {runner} in {what}: {d.diff:+.3g} "
            f"({ci_txt}; the CI covers 0)" + (
                f"; {best} is clearly {word} than {', '.join(k for k, x in diffs.items() if x.clear)}"
                if any(x.clear for x in diffs.values()) else "") + ".")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-markdown table (no 'tabulate' dependency)."""
    if df is None or not len(df):
        return "_(no finished trials)_\n"

    def one(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|")

    cols = [c for c in df.columns if not str(c).startswith("_")]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(one(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


UNITS = {"wall_time": "wall time (s)", "steps_to_target": "steps to target", "time_to_target": "time to target (s)",
         "train_loss_auc": "train-loss AUC"}


def compact_summary(data: StudyData, summ: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """The summary's key columns as "mean ± CI" strings, for summary.md (the CSV has every column).
    ``extra``: further measurement columns a study kind wants shown (e.g. steps_to_target)."""
    from .data import col

    spec = data.spec
    # the reported (test-split) column first, where the trials have one; each header names its split
    keys = ([data.report_col] if data.reports_test else []) + [
        col(spec.metric, "final"), col(spec.metric, "best"), col("val/loss", "final"), "train_loss_auc",
        *extra, "wall_time", "throughput"]
    if data.reports_test:
        test_name = data.report_col.split("_", 1)[1].replace("_", "/", 1)
        UNITS_AT = {data.report_col: f"{test_name} (" + ("final" if spec.metric_at == "final" else
                                                         f"at best {spec.metric}") + ")"}
    else:
        UNITS_AT = {}
    info = study_task(data)
    unit = info.rate if info is not None else "samples"
    out = []
    for _, r in summ.iterrows():
        row = {c: r[c] for c in data.group_cols}
        row.update(n=int(r["n"]), diverged=int(r["n_diverged"]))
        if r.get("n_pruned"):
            row["pruned"] = int(r["n_pruned"])
        units = {**UNITS, **UNITS_AT, "throughput": f"throughput ({unit}/s)"}
        for k in dict.fromkeys(keys):
            if f"{k}_mean" in r:
                row[units.get(k, k.replace("_val_", " val/"))] = fmt_ci(r[f"{k}_mean"], r[f"{k}_ci95"])
        out.append(row)
    return pd.DataFrame(out)
