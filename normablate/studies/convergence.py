"""``convergence``: steps and wall-clock time to a target metric, and the training-loss AUC, per configuration."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import tasks
from ..errors import ConfigError
from . import register
from .base import Comparison, Section, SpecContext, StudyKind


@register("convergence")
class Convergence(StudyKind):
    keys = ("target",)
    summary_extra = ("steps_to_target", "time_to_target")
    definition = """\
* ``convergence``: steps-to-target is the first validation step at which the target metric reaches the target
  value (so its resolution is ``trainer.val_every``); time-to-target the wall-clock seconds of training until
  then; train-loss AUC the mean training loss over all steps of the run (area under the curve / steps; lower =
  faster convergence). In the bar charts, error bars of these positive quantities are drawn clipped at 0 (the
  tables give the symmetric t interval)."""

    def check(self, raw: dict[str, Any], ctx: SpecContext) -> dict[str, Any]:
        target = raw.get("target")
        metrics = tasks.get(ctx.task).metrics  # the primary one first
        if not isinstance(target, dict) or set(target) != {"metric", "value"}:
            raise ConfigError(f"{ctx.where}: kind convergence needs target: {{metric: {metrics[0]}, value: ...}}")
        if target["metric"] not in metrics:
            raise ConfigError(f"{ctx.where}: target.metric={target['metric']!r}; valid: {', '.join(metrics)}")
        if not isinstance(target["value"], (int, float)) or isinstance(target["value"], bool):
            raise ConfigError(f"{ctx.where}: target.value={target['value']!r} must be a number")
        return {"target": {"metric": target["metric"], "value": float(target["value"])}}

    def shape(self, d: dict[str, Any], options: dict[str, Any]) -> None:
        trainer = d.setdefault("trainer", {})
        trainer["target_metric"] = options["target"]["metric"]
        trainer["target_value"] = float(options["target"]["value"])

    def comparison(self, data, summ) -> Comparison:
        from ..analysis.tables import config_values

        return Comparison("train-loss AUC (mean training loss over the run; lower = faster)",
                          config_values(data, "train_loss_auc"), "minimize")

    def section(self, data, summ, out: Path) -> Section:
        from ..analysis import plots as P
        from ..analysis.stats import fmt_ci
        from ..analysis.tables import config_values, conclusion, markdown_table, study_task

        import pandas as pd

        t = data.spec.options["target"]
        rows = []
        for _, r in summ.iterrows():
            row = {c: r[c] for c in data.group_cols}
            row["reached"] = f"{int(r.get('n_reached', 0) or 0)}/{int(r['n'])}"
            # steps/time to target are measured on validation; the metric: test split first where recorded
            for c in ("steps_to_target", "time_to_target", "train_loss_auc", *dict.fromkeys((data.report_col,
                                                                                           data.metric_col))):
                name = c if c in ("steps_to_target", "time_to_target", "train_loss_auc") else \
                    c.replace("_", " ", 1).replace("_", "/", 1)
                row[name] = fmt_ci(r.get(f"{c}_mean", math.nan), r.get(f"{c}_ci95", math.nan))
            rows.append(row)
        comp = self.comparison(data, summ)
        info = study_task(data)
        up = info.direction(t["metric"]) == "maximize" if info is not None else t["metric"].endswith("acc")
        md = (f"## Convergence (target {t['metric']} {'>=' if up else '<='} "
              f"{t['value']:g})\n\n" + markdown_table(pd.DataFrame(rows)) + "\n"
              + conclusion(config_values(data, "steps_to_target"), "minimize",
                           "steps to target (over the runs that reached it)") + "\n\n"
              + conclusion(comp.values, comp.direction, comp.what) + "\n")
        figs = [("Steps and time to target", P.bars(
            data, summ, out, [("steps_to_target", "steps to target (optimizer steps)"),
                              ("time_to_target", "time to target (seconds)"),
                              ("train_loss_auc", "train-loss AUC (nats)")],
            "steps_to_target.png", "convergence speed")),
            (f"{data.spec.metric} per configuration", P.bars(
                data, summ, out, [(data.report_col, P.metric_label(data.spec.metric, data.spec.metric_at, test=data.reports_test))],
                "metric_bars.png", f"{data.spec.metric_at} {data.spec.metric}"))]
        return Section(md, figs)
