"""``StudyData``: a study's counted trials as one pandas table (one row per trial) plus their curves.

Built by ``normablate.report.data.load`` from the storage (or by hand in tests). The trial-attribute names it
reads are those the sweep writes (``normablate.sweep.trial``): ``config``, ``final``, ``best``, ``history``,
``steps_to_target``, ``time_to_target``, ``train_loss_auc``, ``wall_time``, ``throughput``, ``diverged``, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# per-trial scalar measurements besides the metrics (``final_*``/``best_*``), in table order
MEASURES = ("steps_to_target", "time_to_target", "train_loss_auc", "steps", "wall_time", "throughput")


@dataclass
class StudyData:
    name: str
    storage: str
    spec: Any  # the sweep's SweepSpec (metric, direction, options, axes, log_dir, ...)
    trials: pd.DataFrame  # one row per counted trial
    total: int  # trials the sweep is meant to have
    notes: list[str] = field(default_factory=list)
    histories: dict[int, dict] = field(default_factory=dict)  # row index -> {"train/loss": [[step, v], ...], ...}
    # row index -> the run's probe summary (mean over probed steps of each "probe/..." series; RunResult.probes)
    probe_means: dict[int, dict] = field(default_factory=dict)
    group_cols: list[str] | None = None  # columns defining a configuration (None: norm + every axis but seed)
    line_key: str = "norm"  # what one line of a curve plot is (search: "group")

    def __post_init__(self) -> None:
        if self.group_cols is None:
            self.group_cols = ["norm"] + [a for a in self.axis_names if a not in ("norm", "seed")]

    @property
    def axis_names(self) -> list[str]:
        return [a.name for a in self.spec.axes]

    @property
    def metric_col(self) -> str:
        """The study metric's column (validation split): what selection (best LR, best config) uses."""
        return col(self.spec.metric, self.spec.metric_at)

    @property
    def report_col(self) -> str:
        """The column the report states numbers from: the study metric's test-split counterpart at the same point
        (``final_test_acc``; ``best_test_acc`` = test at the weights ``metric_at: best`` selects) where the
        trials have it, else (trials from before the test split) ``metric_col`` itself."""
        test = col("test/" + self.spec.metric.split("/", 1)[-1], self.spec.metric_at)
        if test in self.trials and self.trials[test].notna().any():
            return test
        return self.metric_col

    @property
    def reports_test(self) -> bool:
        return self.report_col != self.metric_col

    def curves(self, rows, key: str) -> list[list]:
        """The ``key`` curve ([[step, value], ...]) of each row that has one."""
        out = [self.histories.get(i, {}).get(key, []) for i in rows]
        return [c for c in out if c]

    def history_keys(self, prefix: str = "") -> list[str]:
        keys: dict[str, None] = {}
        for h in self.histories.values():
            for k in h:
                if k.startswith(prefix):
                    keys[k] = None
        return list(keys)


def col(metric_key: str, at: str = "final") -> str:
    """Column name of a metric: ``col("val/acc") == "final_val_acc"``."""
    return f"{at}_" + metric_key.replace("/", "_")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric per-trial measurements (everything the summary averages)."""
    lead = [c for c in df.columns if c.startswith("final_")] + [c for c in df.columns if c.startswith("best_")]
    return lead + [c for c in MEASURES if c in df.columns]


def ok_rows(sub: pd.DataFrame) -> pd.DataFrame:
    """Finished, non-diverged trials (the ones every mean is over)."""
    return sub[(~sub["diverged"].astype(bool)) & (sub["state"] == "complete")]


def groups(df: pd.DataFrame, cols: list[str]):
    """``df.groupby(cols)`` in first-seen order, keys always tuples; nothing for an empty table."""
    if not len(df):
        return
    for key, sub in df.groupby(cols, sort=False, dropna=False):
        yield (key if isinstance(key, tuple) else (key,)), sub


def mask_for(df: pd.DataFrame, cols: list[str], values) -> Any:
    import numpy as np

    m = np.ones(len(df), bool)
    for c, v in zip(cols, values):
        m &= (df[c] == v).to_numpy()
    return m
