"""Turn a sweep's study into an answer: ``summary.md``, ``summary.csv``, ``trials.csv`` and PNG plots.

    from normablate.report import write_report
    out = write_report("quick")            # -> lightning_logs/quick/report/
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from . import plots, tables
from .data import StudyData, col, load

__all__ = ["StudyData", "add_report_arguments", "cmd_report", "load", "write_report"]


def write_report(study_name: str, storage: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Write the report of ``study_name`` (storage default: ``sqlite:///lightning_logs/optuna.db``) into
    ``out_dir`` (default ``<log_dir>/<study>/report``). Returns the folder."""
    data = load(study_name, storage)
    spec = data.spec
    out = Path(out_dir) if out_dir is not None else Path(spec.log_dir) / study_name / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()

    summ = tables.summary(data)
    summ.to_csv(out / "summary.csv", index=False)
    data.trials.to_csv(out / "trials.csv", index=False)
    figures: list[tuple[str, Path | None]] = [("Training loss", plots.loss_curves(data, out))]
    section = ""
    kind = spec.kind
    metric_c = col(spec.metric, spec.metric_at)
    mlabel = plots.metric_label(spec.metric, spec.metric_at)
    if kind == "lr_sensitivity":
        lr = tables.lr_sensitivity(data)
        if len(lr):
            lr.drop(columns=["_per_lr"]).to_csv(out / "lr_sensitivity.csv", index=False)
        tol = spec.options["tolerance"]
        tol_s = f"{tol:g} x |best|" if spec.options.get("tolerance_relative") else f"{tol:g}"
        key = [c for c in lr.columns if c in data.group_cols] if len(lr) else []
        head = lr[key + ["best_lr", "best_mean", "best_ci95", "usable_lr_min", "usable_lr_max", "width_decades",
                         "diverged_lrs"]] if len(lr) else lr
        cells = lr[key + [c for c in lr.columns if c.startswith("lr=")]] if len(lr) else lr
        section = (f"## LR sensitivity ({spec.metric_at} {spec.metric}, tolerance {tol_s})\n\n"
                   + tables.markdown_table(head)
                   + "\nRead the width together with best_mean: a norm that barely trains at any LR (e.g. stays at "
                     "chance) has every LR within tolerance of its best, so a wide range there means insensitive "
                     "because nothing works, not robust.\n"
                   + f"\n### {spec.metric_at} {spec.metric} at each LR "
                   "(mean ± 95% CI; [k/n diverged])\n\n" + tables.markdown_table(cells))
        figures.append(("LR sensitivity", plots.lr_curves(data, lr, out)))
    elif kind == "batch_size":
        bs = tables.batch_size(data)
        if len(bs):
            bs.to_csv(out / "batch_size.csv", index=False)
        section = (f"## Batch size ({spec.metric_at} {spec.metric}; LR rule {spec.options['lr_scaling']}, base batch "
                   f"{spec.options['base_batch_size']}, budget {spec.options['budget']})\n\n"
                   + tables.markdown_table(bs))
        figures.append(("Batch size", plots.batch_curves(data, out)))
    elif kind == "convergence":
        cv = tables.convergence(data, summ)
        t = spec.options["target"]
        section = (f"## Convergence (target {t['metric']} {'>=' if t['metric'].endswith('acc') else '<='} "
                   f"{t['value']:g})\n\n" + tables.markdown_table(cv))
        figures.append(("Steps and time to target", plots.bars(
            data, summ, out, [("steps_to_target", "steps to target (optimizer steps)"),
                              ("time_to_target", "time to target (seconds)"),
                              ("train_loss_auc", "train-loss AUC (mean loss over steps, nats)")],
            "steps_to_target.png", "convergence speed")))
    elif kind == "search":
        sb = tables.search_best(data)
        if len(sb):
            sb.to_csv(out / "search_best.csv", index=False)
        section = f"## Best hyperparameters per group ({spec.metric_at} {spec.metric}, {spec.direction})\n\n" \
            + tables.markdown_table(sb)
        figures.append(("Search progress", plots.search_history(data, out)))
    if kind in ("grid", "convergence"):
        figures.append((f"{spec.metric} per configuration", plots.bars(
            data, summ, out, [(metric_c, mlabel)], "metric_bars.png", f"{spec.metric_at} {spec.metric}")))

    n_seeds = summ["n"].max() if len(summ) else 0
    lines = [
        f"# Report: {study_name}",
        "",
        f"- kind: **{kind}**; metric: {spec.metric_at} {spec.metric} ({spec.direction})"
        + (f" — {spec.description}" if spec.description else ""),
        f"- trials counted: {len(data.trials)} of {data.total}; up to {n_seeds} seed(s) per configuration",
        f"- storage: `{data.storage}`; runs (TensorBoard): `{Path(spec.log_dir) / study_name}/`",
        f"- written {dt.datetime.now().isoformat(timespec='seconds')}",
    ]
    lines += [f"- note: {n}" for n in data.notes]
    lines += ["", "<details><summary>How the numbers are defined</summary>", "", tables.DEFINITIONS, "",
              "</details>", ""]
    if section:
        lines += [section, ""]
    lines += ["## Every configuration (mean ± 95% CI over seeds; all columns in summary.csv)", "",
              tables.markdown_table(tables.compact_summary(data, summ)), ""]
    lines += ["## Figures", ""]
    for title, path in figures:
        if path is not None:
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", "--study-name", dest="study", required=True, help="the sweep's study name")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///lightning_logs/optuna.db)")
    p.add_argument("--out", help="output folder (default: <log_dir>/<study>/report)")


def cmd_report(args: argparse.Namespace) -> int:
    out = write_report(args.study, storage=args.storage, out_dir=args.out)
    print(f"report: {out / 'summary.md'}  (tables: summary.csv, trials.csv; plots: "
          f"{', '.join(sorted(p.name for p in out.glob('*.png'))) or 'none'})")
    return 0

