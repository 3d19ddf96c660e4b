"""Read a sweep's trials back from the storage into a ``StudyData`` (one row per counted trial).

Counted: for grid kinds, one trial per grid point, the first COMPLETE one by trial number (else the first PRUNED);
any further COMPLETE trial of the same point (only possible after concurrent re-queues by several machines) is
ignored and reported in ``notes``. For grouped kinds (``search``), every COMPLETE or PRUNED trial of every group
study. FAIL trials (crashed runs, workers that died and were retried) are never counted.
"""
from __future__ import annotations

from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from .. import studies
from ..analysis.data import MEASURES, StudyData, col
from ..errors import ConfigError
from ..sweep.queue import INTERRUPTED, read_meta
from ..labels import value_label
from ..sweep.spec import SweepSpec, norm_label
from ..sweep.storage import NoStorage, display_url, normalize_url, open_storage, retry

SCALAR = (int, float, str, bool)


def load(study_name: str, storage: str | None = None) -> StudyData:
    url = normalize_url(storage)
    try:
        st = open_storage(url, create=False)  # a missing study creates nothing (no optuna.db, no folders)
    except NoStorage as e:
        raise ConfigError(f"no study {study_name!r}: {e}") from None
    try:
        main = retry(lambda: optuna.load_study(study_name=study_name, storage=st))
    except KeyError:
        names = optuna.get_all_study_names(st)
        tops = sorted(n for n in names if "/" not in n)
        raise ConfigError(f"no study {study_name!r} in {display_url(url)}; studies there: "
                          f"{', '.join(tops) or 'none'}") from None
    meta = read_meta(st, main)  # (the spec: a system attribute; older studies: the user attribute)
    if meta is None:
        raise ConfigError(f"study {study_name!r} in {display_url(url)} was not made by `normablate sweep` (no spec "
                          f"attribute)")
    spec = SweepSpec.from_json(meta["spec"])
    kind = studies.get(spec.kind)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    histories: dict[int, dict] = {}
    probe_means: dict[int, dict] = {}
    if kind.grouped:
        sources = [(retry(lambda n=n: optuna.load_study(study_name=n, storage=st)), n) for n in meta["groups"]]
    else:
        sources = [(main, study_name)]
    points = spec.points()
    for study, sname in sources:
        trials = retry(lambda s=study: s.get_trials(deepcopy=False))
        counted: list[optuna.trial.FrozenTrial] = []
        if kind.grouped:
            counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        else:
            by_point: dict[int, list] = {}
            for t in trials:
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "point" in t.user_attrs:
                    by_point.setdefault(int(t.user_attrs["point"]), []).append(t)
            for p, ts in sorted(by_point.items()):
                ts.sort(key=lambda t: (t.state != TrialState.COMPLETE, t.number))
                counted.append(ts[0])
                dups = [t.number for t in ts[1:] if t.state == TrialState.COMPLETE]
                if dups:
                    notes.append(f"grid point {points[p].label(spec.axes)}: trial {ts[0].number} counted, "
                                 f"duplicate trial(s) {dups} ignored")
        fails = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("skipped")]
        interrupted = {t.number for t in fails if t.user_attrs.get("error") == INTERRUPTED}
        stopped = len(interrupted)
        if stopped:
            notes.append(f"{sname}: {stopped} trial(s) interrupted by a signal (a stopped sweep), each re-queued"
                         f"{_reruns(trials, interrupted)}; the interrupted ones are not counted")
        if len(fails) - stopped:
            notes.append(f"{sname}: {len(fails) - stopped} failed trial(s) not counted (crashed runs or dead workers, "
                         f"retried where possible)")
        for t in counted:
            row = _row(t, spec, points, sname, kind.grouped)
            histories[len(rows)] = t.user_attrs.get("history") or {}
            probe_means[len(rows)] = t.user_attrs.get("probes") or {}
            rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):  # grid order (the spec's axis order), whatever order the workers finished in
        order = sorted(range(len(df)), key=lambda i: (df["point"].iloc[i] if df["point"].iloc[i] is not None else -1,
                                                      df["trial"].iloc[i]))
        histories = {new: histories[old] for new, old in enumerate(order)}
        probe_means = {new: probe_means[old] for new, old in enumerate(order)}
        df = df.iloc[order].reset_index(drop=True)
    if len(df) < spec.total:
        notes.append(f"{len(df)} of {spec.total} trials finished; the tables cover those")
    return StudyData(study_name, url, spec, df, spec.total, notes, histories, probe_means=probe_means,
                     group_cols=kind.group_cols([a.name for a in spec.axes]), line_key=kind.line_key)


def _reruns(trials: list[optuna.trial.FrozenTrial], interrupted: set[int]) -> str:
    """How the re-runs of the ``interrupted`` trials went, as the note's tail: each records whether it found its
    run's checkpoint (``resumed``); one that did not trained again from step 0 (the folder gone, or the sweep re-run
    from another directory with a relative log_dir), which costs time but not the result."""
    # nb:retry_of holds the whole chain of attempts; its last entry is the trial this one re-runs
    went = [bool(t.user_attrs["resumed"]) for t in trials if "resumed" in t.user_attrs
            and (t.system_attrs.get("nb:retry_of") or [None])[-1] in interrupted]
    r, f = went.count(True), went.count(False)
    how = [f"{r} continued from {'its checkpoint' if r == 1 else 'their checkpoints'}" if r else "",
           f"{f} trained again from step 0 (no checkpoint in {'its folder' if f == 1 else 'their folders'})" if f else ""]
    how = [h for h in how if h]
    return f"; of the re-runs, {' and '.join(how)}" if how else " (not re-run yet)"


def _row(t: optuna.trial.FrozenTrial, spec: SweepSpec, points, sname: str, grouped: bool) -> dict[str, Any]:
    ua = t.user_attrs
    cfg = ua.get("config") or {}
    row: dict[str, Any] = {"trial": t.number, "point": ua.get("point"), "study": sname, "state": t.state.name.lower(),
                           "status": ua.get("status", "pruned" if t.state == TrialState.PRUNED else "?"),
                           "diverged": bool(ua.get("diverged", False))}
    point = points[int(ua["point"])] if "point" in ua and int(ua["point"]) < len(points) else None
    row["norm"] = norm_label((cfg.get("model") or {}).get("norm", "?"))
    row["task"] = cfg.get("task")
    row["source"] = (cfg.get("data") or {}).get("source")
    row["num_classes"] = ua.get("num_classes") or (cfg.get("model") or {}).get("num_classes")  # (recorded from 12/06)
    row["probe_cfg"] = cfg.get("probes") if (cfg.get("probes") or {}).get("enabled") else None
    if grouped:
        row["group"] = ua.get("group", sname.split("/", 1)[-1])
    for a in spec.axes:
        v = point.values[a.key] if point is not None else None
        row[a.name] = v if isinstance(v, SCALAR) else value_label(v)
    for k, v in (ua.get("params") or {}).items():
        row["param_" + k] = v if isinstance(v, SCALAR) or v is None else value_label(v)
    # the LR and batch size actually used (batch_size kind scales the LR)
    row["lr_used"] = (cfg.get("optim") or {}).get("lr")
    row["batch_size_used"] = (cfg.get("data") or {}).get("batch_size")
    row["max_steps"] = (cfg.get("trainer") or {}).get("max_steps")
    row["value"] = t.value if t.state == TrialState.COMPLETE else None
    for at in ("final", "best"):
        for k, v in (ua.get(at) or {}).items():
            row[col(k, at)] = v
    # the test split (trials of older versions have none: missing, never 0): final_test_* = the final model's,
    # best_test_* = the weights that metric_at: best selects (test_at_best; empty when those are the final ones)
    test = ua.get("test") or {}
    for at, values in (("final", test), ("best", ua.get("test_at_best") or test)):
        for k, v in values.items():
            row[col(k, at)] = v
    for k in (*MEASURES, "diverged_step"):
        row[k] = ua.get(k)
    row["run_dir"] = ua.get("run_dir")
    row["cpu_time"] = ua.get("cpu_time")  # (trials of older versions have neither)
    row["cpu"] = (ua.get("versions") or {}).get("cpu")
    row["git_commit"] = (ua.get("versions") or {}).get("git_commit")  # the commit the run ran (None: unknown)
    return row


__all__ = ["StudyData", "col", "load"]
