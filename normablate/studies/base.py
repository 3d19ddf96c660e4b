"""What a study kind is: the contract every entry of ``normablate.studies.REGISTRY`` fulfils.

A kind owns (1) its spec keys and their checking, (2) how it shapes each trial's run config, (3) for kinds whose
trials are drawn by a sampler (``grouped``), how a trial's hyperparameters are suggested, and (4) its report:
tables, figures and a markdown section, plus the comparison its headline states. The sweep (``sweep/``) and
the report (``report/``) only call these methods; neither knows any kind by name.

Kinds import the shared helpers in ``normablate.analysis`` lazily, inside the report methods, so loading a
sweep spec does not import pandas or matplotlib.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dotted import get_dotted
from ..errors import ConfigError, did_you_mean


@dataclass
class SpecContext:
    """What a kind may look at while checking its options."""

    where: str  # "sweep spec 'configs/sweeps/x.yaml'" (for error messages)
    task: str  # a name in normablate.tasks (its facts: tasks.get(task))
    axis_keys: list[str]  # dotted config keys of the grid axes
    base: dict[str, Any]  # the base run config (raw mapping)
    overrides: dict[str, Any]  # dotted key -> value, for every trial

    def value(self, key: str, default: Any = None) -> Any:
        """A run-config value before the grid: the overrides, else the base config, else ``default``."""
        if key in self.overrides:
            return self.overrides[key]
        return get_dotted(self.base, key, default)

    def need_axis(self, kind: str, key: str, example: str) -> None:
        if key not in self.axis_keys:
            raise ConfigError(f"{self.where}: kind {kind} needs a grid axis {key!r} (e.g. {example})")

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> Any:
        if value not in allowed:
            raise ConfigError(f"{self.where}: {key}={value!r}; valid: {', '.join(allowed)}"
                              + did_you_mean(value, allowed))
        return value


@dataclass
class Section:
    """A kind's part of the report."""

    markdown: str = ""  # the section (headings, tables, each table's one-line conclusion)
    figures: list[tuple[str, Path | None]] = field(default_factory=list)  # (title, png path)
    tables: dict[str, Any] = field(default_factory=dict)  # csv file name -> DataFrame


@dataclass
class Comparison:
    """What the report's headline compares: per compared item (e.g. norm), the seeds' values of one quantity."""

    what: str  # e.g. "final val/acc at each norm's best LR"
    values: dict[str, list[float]]
    direction: str  # "maximize" | "minimize"


class StudyKind:
    name = ""
    keys: tuple[str, ...] = ()  # spec keys this kind owns (besides the common ones)
    definition = ""  # how its numbers are defined (markdown; printed in summary.md)
    grouped = False  # True: every grid point is its own Optuna study of sampled trials (see ``search``)
    line_key = "norm"  # what a line of the loss-curve plot is
    per_sample_curves = False  # loss curves over samples seen rather than steps
    summary_extra: tuple[str, ...] = ()  # measurement columns added to the summary table in summary.md
    seeds_are_replicates = True  # a configuration's trials differ only by seed (False for search: Welch is moot)

    # ------------------------------------------------------------------ spec and trial configs
    def check(self, raw: dict[str, Any], ctx: SpecContext) -> dict[str, Any]:
        """Check this kind's spec keys (``raw`` is the whole spec) and return its normalized options."""
        return {}

    def shape(self, d: dict[str, Any], options: dict[str, Any]) -> None:
        """Apply the kind's rule to one trial's raw run config ``d`` (in place), after overrides and grid point."""

    def trials_per_point(self, options: dict[str, Any]) -> int:
        return 1

    def validation_params(self, options: dict[str, Any]) -> list[dict[str, Any] | None]:
        """Extra parameter sets to validate every grid point with (``grouped`` kinds: the search space's corners)."""
        return [None]

    # grouped kinds only
    def sampler(self, options: dict[str, Any]):
        return None

    def suggest(self, trial, options: dict[str, Any]) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ report
    def group_cols(self, axis_names: list[str]) -> list[str] | None:
        """Columns that define a configuration (None: ``norm`` and every axis but ``seed``)."""
        return None

    def section(self, data, summ, out: Path) -> Section:
        return Section()

    def comparison(self, data, summ) -> Comparison:
        """Default: every configuration, by the study metric's reported (test-split, where recorded) column."""
        from ..analysis.tables import config_values

        spec = data.spec
        what = data.report_col.replace("_", " ", 1).replace("_", "/", 1)
        return Comparison(what, config_values(data, data.report_col), spec.direction)


def encode(v: Any) -> Any:
    """A value as an Optuna categorical choice (None/bool/int/float/str); mappings and lists as JSON."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return "json:" + json.dumps(v, sort_keys=True)


def decode(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("json:"):
        return json.loads(v[5:])
    return v
