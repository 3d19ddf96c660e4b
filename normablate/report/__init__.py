"""Turn a sweep's study into an answer: ``summary.md`` (headline first), ``summary.csv``, ``trials.csv``, figures.

    from normablate.report import write_report
    out = write_report("quick")            # -> lightning_logs/quick/report/

The study kind (``normablate.studies``) writes its own section, tables and figures; this module adds what every
study has (the headline, the loss curves, the per-configuration table) and, for studies whose runs probed, the
landscape and ICS views (``probes.py``).
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from .. import studies
from ..sweep.storage import display_url
from . import outdir
from ..analysis.data import StudyData
from .data import load

__all__ = ["StudyData", "add_report_arguments", "cmd_report", "headline", "load", "verdict_lines", "write_report"]


def headline(data: StudyData, summ=None) -> str:
    """The study's main effect in one sentence, with its 95% CI (or 'no clear difference')."""
    from ..analysis import tables

    if summ is None:
        summ = tables.summary(data)
    kind = studies.get(data.spec.kind)
    comp = kind.comparison(data, summ)
    if not kind.seeds_are_replicates:  # e.g. search: one best trial per group, no spread to test against
        best, diffs = tables.compare_to_best(comp.values, comp.direction)
        if best is None:
            return f"No finished trials yet, so nothing can be said about the {comp.what}."
        others = ", ".join(f"{k} {comp.values[k][0]:.4g}" for k in diffs)
        return (f"{best} has the best {comp.what} ({comp.values[best][0]:.4g}" + (f"; {others}" if others
                else "") + "): single runs, no CI; re-run the best settings over seeds to test the difference.")
    return tables.headline(comp.values, comp.direction, comp.what)


def write_report(study_name: str, storage: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Write the report of ``study_name`` (storage default: ``sqlite:///lightning_logs/optuna.db``) into
    ``out_dir`` (default ``<log_dir>/<study>/report``). Returns the folder."""
    from ..analysis import plots, tables, verdicts
    from . import probes

    data = load(study_name, storage)
    spec = data.spec
    kind = studies.get(spec.kind)  # (by name: a sweep process started with older code holds an older SweepSpec)
    default = Path(spec.log_dir) / study_name / "report"
    out = Path(out_dir) if out_dir is not None else default
    before = outdir.claim(out, default=out.resolve() == default.resolve())  # only files it owns (outdir.py)

    summ = tables.summary(data)
    summ.to_csv(out / "summary.csv", index=False)
    data.trials.to_csv(out / "trials.csv", index=False)
    section = kind.section(data, summ, out)
    for name, table in section.tables.items():
        table.to_csv(out / name, index=False)
    probe = probes.section(data, out)
    for name, table in probe.tables.items():
        table.to_csv(out / name, index=False)
    figures = [("Training loss", plots.loss_curves(data, out, per_sample=kind.per_sample_curves)),
               *section.figures, *probe.figures]
    judged = verdicts.evaluate(data)  # the spec's pre-registered hypotheses (none: [])
    if judged:
        import pandas as pd

        pd.DataFrame(verdicts.rows(judged)).to_csv(out / "verdicts.csv", index=False)

    n_seeds = summ["n"].max() if len(summ) else 0
    line = headline(data, summ)
    lines = [
        f"# Report: {study_name}",
        "",
        verdicts.markdown(judged) or "_No pre-registered hypotheses (the spec's `hypotheses:`): every comparison in "
                                     "this report is exploratory._\n",
        f"**Headline:** (exploratory) {line}",
        "",
        f"- kind: **{spec.kind}**; metric: {spec.metric_at} {spec.metric} ({spec.direction})"
        + (f" — {spec.description}" if spec.description else ""),
        f"- trials counted: {len(data.trials)} of {data.total}; up to {n_seeds} "
        + ("seed(s) per configuration" if kind.seeds_are_replicates else "trials per group"),
        f"- storage: `{display_url(data.storage)}`; runs (TensorBoard): `{Path(spec.log_dir) / study_name}/`",
        f"- cost: {cost_line(data.trials)}",
        f"- written {dt.datetime.now().isoformat(timespec='seconds')}",
    ]
    lines += [f"- note: {n}" for n in data.notes]
    if not data.reports_test and len(data.trials):
        lines.append(f"- note: these trials recorded no test-split metrics (runs from before normablate evaluated "
                     f"a test split): the numbers below are {spec.metric}, the split the best LR / configuration "
                     f"was chosen on, so the best ones are biased upward")
    else:
        lines.append(f"- splits: best LR / configuration chosen on {spec.metric_at} {spec.metric} (validation); "
                     f"numbers stated from {data.report_col.replace('_', ' ', 1).replace('_', '/', 1)} (test) "
                     f"unless a column says val/")
    definitions = [verdicts.DEFINITION, tables.DEFINITIONS, kind.definition] \
        + (probes.definitions(data) if probe.markdown else [])
    lines += ["", "<details><summary>How the numbers are defined</summary>", "", "\n".join(d for d in definitions if d),
              "", "</details>", ""]
    if section.markdown:
        lines += [section.markdown, ""]
    if probe.markdown:
        lines += [probe.markdown, ""]
    comp_all = tables.config_values(data, data.report_col)
    lines += ["## Every configuration (mean ± 95% CI over seeds; all columns in summary.csv)", "",
              tables.markdown_table(tables.compact_summary(data, summ, kind.summary_extra)),
              tables.conclusion(comp_all, spec.direction, data.report_col.replace("_", " ", 1).replace("_", "/", 1))
              if len(summ) and kind.seeds_are_replicates else "",
              ""]
    lines += ["## Figures", ""]
    for title, path in figures:
        if path is not None:
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    (out / "summary.md").write_text("\n".join(lines))
    outdir.finish(out, before)  # the manifest; deletes only the files the last report wrote and this one did not
    return out


def cost_line(trials) -> str:
    """What the counted runs cost: summed and median run time, summed CPU time where the runs recorded it
    (``cpu_time``; trials from before it was recorded have none) and the CPU models they finished on."""
    if not len(trials) or "wall_time" not in trials:
        return "no finished runs"
    wall = trials["wall_time"].dropna()
    def runs(n: int) -> str:
        return f"{n} run" + ("s" if n != 1 else "")

    parts = [f"{runs(len(trials))}, {wall.sum() / 3600:.2f} h of run time summed (median {wall.median():.0f} s per run)"]
    cpu = trials["cpu_time"].dropna() if "cpu_time" in trials else trials.iloc[:0]
    if len(cpu):
        parts.append(f"{cpu.sum() / 3600:.2f} CPU-hours summed"
                     + (f" over the {runs(len(cpu))} that recorded it" if len(cpu) < len(trials) else ""))
    else:
        parts.append("CPU time not recorded (runs from before normablate recorded it)")
    if "cpu" in trials and trials["cpu"].notna().any():
        models = trials["cpu"].dropna().value_counts()
        parts.append("on " + ", ".join(f"{m} ({runs(n)})" if len(models) > 1 else m for m, n in models.items()))
    return "; ".join(parts)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", "--study-name", dest="study", required=True, help="the sweep's study name")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///lightning_logs/optuna.db)")
    p.add_argument("--out", help="output folder (default: <log_dir>/<study>/report)")


def cmd_report(args: argparse.Namespace) -> int:
    out = write_report(args.study, storage=args.storage, out_dir=args.out)
    print(f"report: {out / 'summary.md'}  (tables: summary.csv, trials.csv; plots: "
          f"{', '.join(sorted(p.name for p in out.glob('*.png'))) or 'none'})")
    print(f"headline: {first_line(out / 'summary.md')}")
    for line in verdict_lines(out):  # the pre-registered verdicts come last
        print(line)
    return 0


def verdict_lines(out: Path) -> list[str]:
    """The one-line verdicts of a written report (``verdicts.csv``; [] when the spec has no hypotheses)."""
    import csv

    path = Path(out) / "verdicts.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r["line"] for r in csv.DictReader(f)]


def first_line(summary_md: Path) -> str:
    """The headline sentence of a written summary.md."""
    for line in summary_md.read_text().splitlines():
        if line.startswith("**Headline:** "):
            return line[len("**Headline:** "):]
    return "?"
