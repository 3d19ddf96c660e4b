"""``grid``: any crossed grid of config values; the study metric per configuration, compared with the best."""
from __future__ import annotations

from pathlib import Path

from . import register
from .base import Section, StudyKind


@register("grid")
class Grid(StudyKind):
    definition = "* ``grid``: the study metric per configuration (every axis value but the seed)."

    def section(self, data, summ, out: Path) -> Section:
        from ..analysis import plots as P

        spec = data.spec
        label = P.metric_label(spec.metric, spec.metric_at, test=data.reports_test)  # the report's (test) numbers
        return Section("", [(f"{spec.metric} per configuration", P.bars(
            data, summ, out, [(data.report_col, label)], "metric_bars.png", f"{spec.metric_at} {spec.metric}"))])
