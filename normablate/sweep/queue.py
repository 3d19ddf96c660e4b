"""The work queue: a sweep's Optuna studies, their WAITING trials, claiming one, and counting progress.

* Grid kinds: one study. When it is created, every grid point is enqueued as a WAITING trial whose fixed params
  are the point's axis values.
* Grouped kinds (``search``): the main study holds the spec only; each group (grid point, e.g. each norm) is
  its own study ``<study>/<group>`` with the kind's sampler, and ``trials_per_point`` WAITING trials are
  enqueued in each; the sampler draws a trial's hyperparameters when a worker picks it up.

Why a queue rather than ``study.optimize`` with ``GridSampler``: Optuna's GridSampler picks a random unvisited
point per trial; two workers can pick the same point, and once every point has *started* an idle worker re-runs
a point that is still running elsewhere. Popping a WAITING trial is atomic in every storage (a row lock in an
RDB, log order in a journal), so each point is claimed by exactly one worker. A worker claims a retry (a stopped or
failed trial queued again: it resumes from its checkpoint) before any other waiting trial, then the rest in
queue order.

The study *system* attribute ``normablate:spec`` holds ``{"spec", "fingerprint", "total", "kind", "groups"}`` (the
report reads it: ``read_meta``); the *user* attribute ``normablate`` holds a compact summary (kind, metric,
direction, total, fingerprint), which is what ``optuna studies`` prints (it prints every user attribute, no system
one). Studies made before (the whole record in the user attribute) are read the same. ``normablate_ready`` is set
once every trial is enqueued. Every study is given its metric's name (``set_metric_names``: optuna-dashboard and
``trials_dataframe`` show ``val/acc``, not "Objective 0").
"""
from __future__ import annotations

import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..errors import ConfigError
from .liveness import HOST
from .pruners import make_pruner
from .spec import Point
from .storage import display_url, retry

ATTR = "normablate"  # study user attr: compact {"kind", "metric", "direction", "total", "fingerprint"}
SPEC_ATTR = "normablate:spec"  # study system attr: {"spec", "fingerprint", "total", "groups", "kind"}
READY = "normablate_ready"

INTERRUPTED = "run interrupted by a signal (checkpoint saved)"  # a FAIL trial's error: a re-queued copy resumes it


def read_meta(storage, study: optuna.Study) -> dict[str, Any] | None:
    """A sweep study's full record (spec, fingerprint, total, kind, groups): the system attribute, else (a study made
    before it existed) the user attribute; None for a study not made by ``normablate sweep``."""
    full = retry(lambda: storage.get_study_system_attrs(study._study_id)).get(SPEC_ATTR)
    if full is not None:
        return full
    old = study.user_attrs.get(ATTR)
    return old if isinstance(old, dict) and "spec" in old else None


def write_meta(storage, study: optuna.Study, meta: dict[str, Any]) -> None:
    """The full record as a system attribute first, then the compact user attribute (a reader waits for that)."""
    spec = meta["spec"]
    retry(lambda: storage.set_study_system_attr(study._study_id, SPEC_ATTR, meta))
    compact = {"kind": meta["kind"], "metric": spec.get("metric"), "direction": spec.get("direction"),
               **{k: v for k, v in meta.items() if k not in ("spec", "groups", "kind")}}  # total, fingerprint, ...
    retry(lambda: study.set_user_attr(ATTR, compact))


def name_metric(study: optuna.Study, metric: str) -> None:
    """``study.set_metric_names([metric])`` unless already so (old studies get it when next loaded)."""
    if study.metric_names != [metric]:
        with warnings.catch_warnings():  # (ExperimentalWarning since Optuna 3.2; the interface has not changed)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry(lambda: study.set_metric_names([metric]))


@dataclass
class Slot:
    """A claimed trial with what it evaluates."""

    study: optuna.Study
    trial: optuna.Trial
    point: Point
    group: str | None = None


@dataclass
class Counts:
    total: int
    done: int = 0  # slots with a COMPLETE or PRUNED trial
    running: int = 0
    waiting: int = 0
    failed: int = 0  # slots with only FAIL trials (re-run the command to retry them)
    diverged: int = 0
    pruned: int = 0
    duplicates: int = 0  # extra COMPLETE trials of an already finished grid point (reports use the first)

    def line(self) -> str:
        extra = [f"{self.diverged} diverged"] + ([f"{self.pruned} pruned"] if self.pruned else []) \
            + ([f"{self.failed} failed"] if self.failed else []) + [f"{self.running} running"]
        return f"{self.done}/{self.total} trials done ({', '.join(extra)})"


def _is_sweep_run(name: str) -> bool:
    """Whether a run folder name is one a sweep trial gets (``t0007-bn-lr0.1-s0``, grouped kinds ``bn-t007``)."""
    return re.match(r"^t\d{4,}-", name) is not None or re.search(r"-t\d{3,}$", name) is not None


class QueueMixin:
    """Set-up, enqueueing, counting and claiming (part of ``runner.Sweep``)."""

    def _group_names(self) -> list[str]:
        return [self.spec.group_study_name(p) for p in self.points] if self.kind.grouped else []

    def _load(self, name: str, point: Point | None) -> optuna.Study:
        sampler = self.kind.sampler(self.spec.options)
        pruner = make_pruner(self.spec.pruner, self._pruner_max_steps(point))
        return retry(lambda: optuna.load_study(study_name=name, storage=self.storage, sampler=sampler, pruner=pruner))

    def _pruner_max_steps(self, point: Point | None) -> int:
        """The ``max_steps`` a study's pruner is built with (hyperband's resource): its group's, or the first point's."""
        return self.spec.trial_config(point or self.points[0], self._params_lows(), run="x").trainer.max_steps

    def _params_lows(self) -> dict[str, Any] | None:
        return self.spec.search_params_for_validation()[0]

    def setup(self, create: bool = True) -> None:
        """Create the study (and enqueue every trial) or load it and check it is the same sweep."""
        spec = self.spec
        meta = {"spec": spec.to_json(), "fingerprint": spec.fingerprint(), "total": spec.total, "kind": spec.kind,
                "groups": self._group_names()}
        if spec.hypotheses:  # pre-registered: frozen with the spec (its fingerprint covers them too)
            from .hypotheses import digest

            meta["hypotheses_hash"] = digest(spec.hypotheses)
        created = False
        if create and not self._exists():
            run_root = Path(spec.log_dir) / spec.study_name
            if run_root.exists() and any(p.is_dir() and _is_sweep_run(p.name) for p in run_root.iterdir()):
                # trial runs of a sweep whose study is gone (plain `normablate train` runs there are no obstacle)
                raise ConfigError(f"{str(run_root)!r} already holds runs of an earlier sweep named "
                                  f"{spec.study_name!r} (its study is not in {display_url(self.url)}); delete that folder or "
                                  f"choose another --study-name")
            try:
                main = retry(lambda: optuna.create_study(study_name=spec.study_name, storage=self.storage,
                                                         direction=spec.direction, load_if_exists=False))
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                pass
        if created:
            write_meta(self.storage, main, meta)
            self.log(f"new study in {display_url(self.url)}: {spec.kind}, {spec.total} trials")
            for name in meta["groups"]:
                retry(lambda n=name: optuna.create_study(study_name=n, storage=self.storage, direction=spec.direction,
                                                         load_if_exists=True))
        else:
            main = self._wait_ready_or_load(meta)
        name_metric(main, spec.metric)
        groups = meta["groups"]
        if self.kind.grouped:
            self.studies = [(self._load(n, p), p) for n, p in zip(groups, self.points)]
            for study, _ in self.studies:
                name_metric(study, spec.metric)
        else:
            self.studies = [(self._load(spec.study_name, None), None)]
        if created:
            self._enqueue_missing(first=True)
            main.set_user_attr(READY, True)
        elif create:
            self._enqueue_missing(first=False)
        self.done_at_start = self.counts().done

    def _exists(self) -> bool:
        try:
            retry(lambda: self.storage.get_study_id_from_name(self.spec.study_name))
        except KeyError:
            return False
        return True

    def _wait_ready_or_load(self, meta: dict[str, Any], timeout: float = 120.0) -> optuna.Study:
        spec = self.spec
        try:
            main = retry(lambda: optuna.load_study(study_name=spec.study_name, storage=self.storage))
        except KeyError:
            raise ConfigError(f"no study {spec.study_name!r} in {display_url(self.url)}") from None
        deadline = time.time() + 10  # its creator writes the spec right after creating it
        while ATTR not in main.user_attrs and time.time() < deadline:
            time.sleep(0.5)
            main = retry(lambda: optuna.load_study(study_name=spec.study_name, storage=self.storage))
        old = read_meta(self.storage, main)
        if old is None:
            raise ConfigError(f"study {spec.study_name!r} in {display_url(self.url)} was not made by `normablate sweep` (no spec "
                              f"attribute); choose another --study-name, or delete it: optuna delete-study "
                              f"--study-name {spec.study_name} --storage {display_url(self.url)}")
        deadline = time.time() + timeout
        if old["fingerprint"] != meta["fingerprint"] and old["spec"].get("hypotheses") \
                and adds_seeds(old["spec"], meta["spec"]):
            raise ConfigError(f"study {spec.study_name!r} in {display_url(self.url)} has pre-registered hypotheses: adding seeds "
                              f"after results exist is optional stopping, which the verdicts' error rates do not "
                              f"allow for; pass --study-name NEW to run the larger study from scratch")
        if old["fingerprint"] != meta["fingerprint"] and not self.kind.grouped \
                and adds_seeds(old["spec"], meta["spec"]):
            # more seeds for the same experiment: the new points come after the old ones (seed is the outermost
            # axis), so finished trials keep their point index and only the new seeds are enqueued
            write_meta(self.storage, main, meta)
            self.log(f"seeds {old['spec']['grid']['seed']} -> {meta['spec']['grid']['seed']}: "
                     f"{meta['total'] - old['total']} more trials")
            old = meta
        if old["fingerprint"] != meta["fingerprint"]:
            diff = _spec_diff(old["spec"], meta["spec"])
            why = ("; its hypotheses were fixed before its first trial, and a changed hypothesis is a new study"
                   if any(d.startswith("hypotheses") for d in diff) else "")
            raise ConfigError(f"study {spec.study_name!r} in {display_url(self.url)} was started from a different sweep spec "
                              f"(differs in: {', '.join(diff) or '?'}){why}; re-run with the original spec, or pass "
                              f"--study-name NEW to start a new study")
        while not main.user_attrs.get(READY) and time.time() < deadline:  # its creator is still enqueueing
            time.sleep(0.5)
            main = retry(lambda: optuna.load_study(study_name=spec.study_name, storage=self.storage))
        return main

    def _enqueue_missing(self, first: bool) -> None:
        """Enqueue a WAITING trial for every point (search: every budget unit) that has no trial waiting, running
        or finished. At creation that is all of them; on a re-run, the ones whose trials failed."""
        n_new = 0
        for study, group in self.studies:
            trials = retry(lambda s=study: s.get_trials(deepcopy=False))
            live = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE,
                                                      TrialState.PRUNED)]
            failed = _failed_unretried(trials)
            new = []
            if self.kind.grouped:
                missing = max(0, self.spec.trials_per_point - len(live))
                for old in failed[:missing]:  # a failed trial resumes in its own folder, with its own params
                    new.append(self._retry_of(old))
                for _ in range(missing - len(new)):
                    new.append(optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={"fixed_params": {}},
                        user_attrs={"point": group.index, "group": group.label(self.spec.axes),
                                    "axes": group.labels(self.spec.axes)}))
            else:
                have = {t.user_attrs.get("point") for t in live}
                last_failed = {t.user_attrs.get("point"): t for t in failed}  # (sorted: the latest attempt wins)
                for p in self.points:
                    if p.index in have:
                        continue
                    if p.index in last_failed:  # resumes from its checkpoint, in its own folder
                        new.append(self._retry_of(last_failed[p.index]))
                        continue
                    fixed = {a.key: a.choices[a.values.index(p.values[a.key])] for a in self.spec.axes}
                    new.append(optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={"fixed_params": fixed},
                        user_attrs={"point": p.index, "axes": p.labels(self.spec.axes)}))
            if new:
                retry(lambda s=study, n=new: s.add_trials(n))
                n_new += len(new)
        if n_new and not first:
            again = [f"trial {n} ({run})" for n, run in self.retried]
            self.log(f"re-queued {n_new} trial(s) that had failed or were never queued"
                     + (f"; {len(again)} resume in their own folders: {', '.join(again)}" if again else ""))

    def _retry_of(self, old: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        """A retry of failed trial ``old`` on a re-run of the command (``retry_of``); its attempts count from here."""
        self.retried.append((old.number, run_of(old)))
        return retry_of(old, "failed; the command was run again", rerun=True)

    # ------------------------------------------------------------------ state
    def counts(self) -> Counts:
        c = Counts(total=self.spec.total)
        for study, _ in self.studies:
            trials = retry(lambda s=study: s.get_trials(deepcopy=False))
            c.running += sum(t.state == TrialState.RUNNING for t in trials)
            c.waiting += sum(t.state == TrialState.WAITING for t in trials)
            if self.kind.grouped:
                fin = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                c.done += min(len(fin), self.spec.trials_per_point)
                c.diverged += sum(bool(t.user_attrs.get("diverged")) for t in fin)
                c.pruned += sum(t.state == TrialState.PRUNED for t in fin)
                c.failed += max(0, self.spec.trials_per_point - len(fin) - sum(
                    t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials))
                continue
            by_point: dict[int, list] = {}
            for t in trials:
                by_point.setdefault(t.user_attrs.get("point"), []).append(t)
            for p in self.points:
                ts = by_point.get(p.index, [])
                fin = sorted((t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                             key=lambda t: t.number)
                if fin:
                    c.done += 1
                    c.duplicates += len(fin) - 1
                    c.diverged += bool(fin[0].user_attrs.get("diverged"))
                    c.pruned += fin[0].state == TrialState.PRUNED
                elif not any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in ts):
                    c.failed += 1
        return c

    def claim(self) -> Slot | None:
        n = len(self.studies)
        for k in range(n):
            study, group = self.studies[(self._rr + k) % n]
            waiting = retry(lambda s=study: s.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            # a retry first (it resumes from its checkpoint, and its folder may not outlive the session), then the
            # rest in queue order; a retry is enqueued behind every trial that was waiting when its trial stopped
            for t in sorted(waiting, key=lambda t: (not t.system_attrs.get("nb:retry_of"), t.number)):
                try:
                    if not retry(lambda tid=t._trial_id: self.storage.set_trial_state_values(tid, TrialState.RUNNING)):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                self.my_trials.add(t._trial_id)
                self._rr = (self._rr + k + 1) % n
                worker = {"host": HOST, "pid": os.getpid(), "hostname": socket.gethostname()}
                retry(lambda tid=t._trial_id: self.storage.set_trial_system_attr(tid, "nb:worker", worker))
                trial = retry(lambda tid=t._trial_id: optuna.Trial(study, tid))
                point = group if group is not None else self.points[int(t.user_attrs["point"])]
                return Slot(study, trial, point, group.label(self.spec.axes) if group is not None else None)
        return None

    def _is_duplicate(self, slot: Slot) -> int | None:
        """The trial that makes this claimed one redundant, or None: a grid point finished by another trial, or,
        for a retry, an earlier retry of the same attempt (two commands started at once, e.g. a re-submitted Slurm
        array, can both find a failed trial unretried and both queue its retry; only the lowest-numbered one runs,
        whatever its state, so two workers never resume one checkpoint). Both are possible only after concurrent
        re-queues."""
        trials = retry(lambda: slot.study.get_trials(deepcopy=False))
        chain = next(t for t in trials if t.number == slot.trial.number).system_attrs.get("nb:retry_of")
        if chain:
            for t in trials:
                if t.number < slot.trial.number and t.system_attrs.get("nb:retry_of") == chain:
                    return t.number
        if self.kind.grouped:
            return None
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.user_attrs.get("point") == slot.point.index:
                return t.number
        return None


def retry_of(t: optuna.trial.FrozenTrial, reason: str, rerun: bool) -> optuna.trial.FrozenTrial:
    """A WAITING retry of trial ``t``: same point, params and run folder, so it resumes from the run's
    ``last.ckpt``. Every retry is built here: a killed or stale trial's by the reaper (``rerun=False``), a stopped
    one's by its worker (``_interrupt``) and a failed one's when the command is run again (both ``rerun=True``).
    ``nb:retry_of`` holds the whole chain of attempts; ``nb:rerun_at`` is the chain's length at the last re-run of the command, from which the reaper counts its
    ``max_retry`` (so each command gets its own retries)."""
    history = list(t.system_attrs.get("nb:retry_of", [])) + [t.number]
    system = {"fixed_params": {**t.system_attrs.get("fixed_params", {}), **t.params},
              "nb:retry_of": history, "nb:retry_reason": reason,
              "nb:rerun_at": len(history) if rerun else int(t.system_attrs.get("nb:rerun_at", 0))}
    run = run_of(t)
    if run:
        system["nb:run"] = run
    keep = {k: t.user_attrs[k] for k in ("point", "axes", "group") if k in t.user_attrs}
    return optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=system, user_attrs=keep)


def run_of(t: optuna.trial.FrozenTrial) -> str | None:
    """Trial ``t``'s run folder name: recorded by its worker (``run``), else, for a retry failed before its worker
    recorded it, the one it was queued with (``nb:run``)."""
    return t.user_attrs.get("run") or t.system_attrs.get("nb:run")


def _failed_unretried(trials: list) -> list:
    """FAIL trials that ran (they have a run folder), were not skipped as duplicates and have no retry yet (no
    trial lists them in ``nb:retry_of``), oldest first."""
    retried = {n for t in trials for n in t.system_attrs.get("nb:retry_of", [])}
    return sorted((t for t in trials if t.state == TrialState.FAIL and run_of(t)
                   and not t.user_attrs.get("skipped") and t.number not in retried), key=lambda t: t.number)


def adds_seeds(old: dict, new: dict) -> bool:
    """Whether spec ``new`` is spec ``old`` with more seeds: the first grid axis is ``seed``, its old values are the
    start of the new ones, and nothing else differs (but the description)."""
    og, ng = list(old["grid"].items()), list(new["grid"].items())
    if not og or og[0][0] != "seed" or [k for k, _ in og] != [k for k, _ in ng] or og[1:] != ng[1:]:
        return False
    (_, o_seeds), (_, n_seeds) = og[0], ng[0]
    if len(n_seeds) <= len(o_seeds) or n_seeds[:len(o_seeds)] != o_seeds:
        return False
    return not [d for d in _spec_diff(old, new) if not d.startswith("grid.") and d != "description"]


def _spec_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _spec_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out

