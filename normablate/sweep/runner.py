"""Run a sweep: a work queue of Optuna trials shared by any number of workers, processes and machines.

How it is laid out in the storage
---------------------------------
* Grid kinds (``lr_sensitivity``, ``batch_size``, ``convergence``, ``grid``): one study. When the study is
  created, every grid point is enqueued as a WAITING trial whose fixed params are the point's axis values.
* ``search``: the main study holds the spec only; each group (grid point, e.g. each norm) is its own study
  ``<study>/<group>`` with its own sampler (TPE by default), and ``n_trials`` WAITING trials are enqueued in each;
  the sampler draws a trial's hyperparameters when a worker picks it up, from the trials finished by then.

Why a queue rather than ``study.optimize`` with ``GridSampler``: Optuna's GridSampler (5.0) picks a random
unvisited point per trial; two workers can pick the same point, and once every point has *started* an idle
worker re-runs a point that is still running elsewhere. Popping a WAITING trial is atomic in every storage
(a row lock in an RDB, log order in a journal), so each point is claimed by exactly one worker.

Dead workers
------------
A worker writes a heartbeat (time and ``host:pid``) into its trial's system attributes every
``heartbeat.interval`` seconds. Before claiming work, every worker fails RUNNING trials whose heartbeat value has
not changed for ``heartbeat.grace`` seconds of its own clock (so clock skew between machines cannot kill a live
trial) or whose process is gone (same host, pid not alive), and enqueues a retry that keeps
the point, the params and the run directory, so the retry resumes from the run's ``last.ckpt``. Failing a
trial is atomic, so only one worker enqueues the retry. We keep our own heartbeat because Optuna's (RDB only,
and tied to ``study.optimize``) does not exist for journal storage.

Re-running the command continues the sweep: finished trials are never repeated, points whose trial failed are
enqueued again once at start-up, and a worker stops when no trial is waiting or running.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config import from_dict, to_dict
from ..errors import ConfigError
from ..result import RunResult
from .spec import Point, SweepSpec, decode, load_spec, make_pruner, make_sampler
from .storage import normalize_url, open_storage, retry

ATTR = "normablate"  # study user attr: {"spec", "fingerprint", "total", "groups", "kind"}
READY = "normablate_ready"
HISTORY_POINTS = 256  # curves kept per metric in the trial record (downsampled by averaging)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def host_id() -> str:
    """This machine and PID namespace (hostnames repeat across containers; boot id + pid-ns inode do not)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return ":".join(parts)


HOST = host_id()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs; a zombie (killed, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def load_trainer(path: str) -> Callable[..., RunResult]:
    mod, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"trainer_fn {path!r} cannot be imported: {e}") from None


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def compact_history(history: dict[str, list], max_steps: int, points: int = HISTORY_POINTS) -> dict[str, list]:
    """Curves for plots, at most ``points`` per metric: steps are binned by ``ceil(max_steps / points)`` (the same
    bins for every run of a config) and each bin keeps its last step and the mean of its finite values."""
    width = max(1, math.ceil(max_steps / points))
    out: dict[str, list] = {}
    for name, pts in history.items():
        if len(pts) <= points:
            out[name] = [[int(s), float(v) if math.isfinite(float(v)) else None] for s, v in pts]
            continue
        bins: dict[int, list] = {}
        for s, v in pts:
            bins.setdefault((int(s) - 1) // width, []).append((int(s), float(v)))
        rows = []
        for _, items in sorted(bins.items()):
            finite = [v for _, v in items if math.isfinite(v)]
            rows.append([items[-1][0], sum(finite) / len(finite) if finite else None])
        out[name] = rows
    return out


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class Heartbeat:
    """Writes ``nb:heartbeat`` (unix time) into a RUNNING trial every ``interval`` s, from a daemon thread."""

    def __init__(self, storage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def beat(self) -> None:
        self.storage.set_trial_system_attr(self.trial_id, "nb:heartbeat", time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # someone (the reaper) finished the trial; nothing left to keep alive
            except Exception:  # noqa: BLE001  a transient storage error: try again next beat
                pass

    def __enter__(self) -> Heartbeat:
        retry(self.beat)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


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


@dataclass
class SweepResult:
    """What ``run_sweep`` returns: where the study is and how it ended."""

    study_name: str
    storage: str
    kind: str
    counts: Counts
    studies: list[str] = field(default_factory=list)  # the Optuna studies holding trials
    elapsed: float = 0.0
    exit_code: int = 0  # 0 ok, 1 some trials failed, 130 interrupted
    report: Path | None = None

    @property
    def complete(self) -> bool:
        return self.counts.done >= self.counts.total

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage))


class Sweep:
    """One process's handle on a sweep: creates/loads its studies, reaps dead trials, claims and runs trials."""

    def __init__(self, spec: SweepSpec, storage_url: str | None = None, *, verbose: bool = True,
                 runtime: dict[str, Any] | None = None, worker: str = "") -> None:
        self.spec = spec
        self.url = normalize_url(storage_url or spec.storage, spec.log_dir)
        self.storage = open_storage(self.url, spec.log_dir)
        self.verbose = verbose
        self.runtime = runtime or {}  # config defaults for this machine (threads per worker)
        self.worker = worker
        self.points = spec.points()
        self.my_trials: set[int] = set()
        self._beats: dict[int, tuple[Any, float]] = {}  # trial id -> (last heartbeat value, local time first seen)
        self.interrupted = False
        self.t0 = time.time()
        self.done_at_start = 0
        self._rr = 0
        self.studies: list[tuple[optuna.Study, Point | None]] = []

    # ------------------------------------------------------------------ set-up
    def log(self, msg: str) -> None:
        if self.verbose:
            prefix = f"[{self.spec.study_name}{'/' + self.worker if self.worker else ''}]"
            print(f"{prefix} {msg}", flush=True)

    def _group_names(self) -> list[str]:
        return [self.spec.group_study_name(p) for p in self.points] if self.spec.kind == "search" else []

    def _load(self, name: str, point: Point | None) -> optuna.Study:
        sampler = make_sampler(self.spec.options["sampler"]) if self.spec.kind == "search" else None
        max_steps = int(from_dict(self.spec.trial_dict(point or self.points[0], self._params_lows(),
                                                       run="x")).trainer.max_steps)
        pruner = make_pruner(self.spec.pruner, max_steps)
        return retry(lambda: optuna.load_study(study_name=name, storage=self.storage, sampler=sampler, pruner=pruner))

    def _params_lows(self) -> dict[str, Any] | None:
        return self.spec.search_params_for_validation()[0] if self.spec.kind == "search" else None

    def setup(self, create: bool = True) -> None:
        """Create the study (and enqueue every trial) or load it and check it is the same sweep."""
        spec = self.spec
        meta = {"spec": spec.to_json(), "fingerprint": spec.fingerprint(), "total": spec.total, "kind": spec.kind,
                "groups": self._group_names()}
        created = False
        if create and not self._exists():
            run_root = Path(spec.log_dir) / spec.study_name
            if run_root.exists() and any(p.is_dir() and p.name != "report" for p in run_root.iterdir()):
                raise ConfigError(f"{str(run_root)!r} already holds runs of an earlier sweep named "
                                  f"{spec.study_name!r} (its study is not in {self.url}); delete that folder or "
                                  f"choose another --study-name")
            try:
                main = retry(lambda: optuna.create_study(study_name=spec.study_name, storage=self.storage,
                                                         direction=spec.direction, load_if_exists=False))
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                pass
        if created:
            main.set_user_attr(ATTR, meta)
            self.log(f"new study in {self.url}: {spec.kind}, {spec.total} trials")
            for name in meta["groups"]:
                retry(lambda n=name: optuna.create_study(study_name=n, storage=self.storage, direction=spec.direction,
                                                         load_if_exists=True))
        else:
            main = self._wait_ready_or_load(meta)
        groups = meta["groups"]
        if spec.kind == "search":
            self.studies = [(self._load(n, p), p) for n, p in zip(groups, self.points)]
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
            raise ConfigError(f"no study {spec.study_name!r} in {self.url}") from None
        deadline = time.time() + 10  # its creator writes the spec right after creating it
        while ATTR not in main.user_attrs and time.time() < deadline:
            time.sleep(0.5)
            main = retry(lambda: optuna.load_study(study_name=spec.study_name, storage=self.storage))
        old = main.user_attrs.get(ATTR)
        if old is None:
            raise ConfigError(f"study {spec.study_name!r} in {self.url} was not made by `normablate sweep` (no spec "
                              f"attribute); choose another --study-name, or delete it: optuna delete-study "
                              f"--study-name {spec.study_name} --storage {self.url}")
        deadline = time.time() + timeout
        if old["fingerprint"] != meta["fingerprint"]:
            diff = _spec_diff(old["spec"], meta["spec"])
            raise ConfigError(f"study {spec.study_name!r} in {self.url} was started from a different sweep spec "
                              f"(differs in: {', '.join(diff) or '?'}); re-run with the original spec, or pass "
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
            new = []
            if self.spec.kind == "search":
                missing = max(0, self.spec.n_trials - len(live))
                for _ in range(missing):
                    new.append(optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={"fixed_params": {}},
                        user_attrs={"point": group.index, "group": group.label(self.spec.axes),
                                    "axes": group.labels(self.spec.axes)}))
            else:
                have = {t.user_attrs.get("point") for t in live}
                for p in self.points:
                    if p.index in have:
                        continue
                    fixed = {a.key: a.choices[a.values.index(p.values[a.key])] for a in self.spec.axes}
                    new.append(optuna.trial.create_trial(
                        state=TrialState.WAITING, system_attrs={"fixed_params": fixed},
                        user_attrs={"point": p.index, "axes": p.labels(self.spec.axes)}))
            if new:
                retry(lambda s=study, n=new: s.add_trials(n))
                n_new += len(new)
        if n_new and not first:
            self.log(f"re-queued {n_new} trial(s) that had failed or were never queued")

    # ------------------------------------------------------------------ state
    def counts(self) -> Counts:
        c = Counts(total=self.spec.total)
        for study, _ in self.studies:
            trials = retry(lambda s=study: s.get_trials(deepcopy=False))
            c.running += sum(t.state == TrialState.RUNNING for t in trials)
            c.waiting += sum(t.state == TrialState.WAITING for t in trials)
            if self.spec.kind == "search":
                fin = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                c.done += min(len(fin), self.spec.n_trials)
                c.diverged += sum(bool(t.user_attrs.get("diverged")) for t in fin)
                c.pruned += sum(t.state == TrialState.PRUNED for t in fin)
                c.failed += max(0, self.spec.n_trials - len(fin) - sum(
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

    def progress(self, last: str = "") -> None:
        c = self.counts()
        elapsed = time.time() - self.t0
        rate = (c.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        eta = (c.total - c.done) / rate if rate > 0 else None
        self.log(f"{c.line()} | elapsed {fmt_time(elapsed)} | ETA {fmt_time(eta) if c.done < c.total else '0:00'}"
                 + (f" | {last}" if last else ""))

    # ------------------------------------------------------------------ dead workers
    def reap_stale(self) -> int:
        """Fail RUNNING trials of dead workers and enqueue their retries. Returns how many were reaped."""
        grace = float(self.spec.heartbeat["grace"])
        now = time.time()
        n = 0
        for study, group in self.studies:
            for t in retry(lambda s=study: s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
                if t._trial_id in self.my_trials:
                    continue
                w = t.system_attrs.get("nb:worker") or {}
                beat = t.system_attrs.get("nb:heartbeat")
                if beat is None and t.datetime_start is not None:
                    beat = t.datetime_start.timestamp()
                dead = w.get("host") == HOST and isinstance(w.get("pid"), int) and w["pid"] != os.getpid() \
                    and not pid_alive(w["pid"])
                # Silent = the heartbeat *value* has not changed for `grace` seconds of this machine's clock
                # (never compare another machine's timestamps with ours: clock skew would kill live trials).
                seen_value, seen_at = self._beats.get(t._trial_id, (None, now))
                if beat != seen_value:
                    seen_value, seen_at = beat, now
                self._beats[t._trial_id] = (seen_value, seen_at)
                silent = beat is not None and now - seen_at > grace
                if not (dead or silent):
                    continue
                try:
                    if not self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # finished meanwhile, or another worker reaped it first
                why = "its worker process is gone" if dead else f"no heartbeat for {now - seen_at:.0f}s"
                self.log(f"trial {t.number} ({t.user_attrs.get('run', '?')}) failed: {why}; queued again")
                self._requeue(study, t, reason=why)
                n += 1
        return n

    def _requeue(self, study: optuna.Study, t: optuna.trial.FrozenTrial, reason: str) -> None:
        """Enqueue a retry of ``t``: same point and params, same run directory (so it resumes)."""
        history = list(t.system_attrs.get("nb:retry_of", [])) + [t.number]
        if len(history) > int(self.spec.heartbeat["max_retry"]):
            self.log(f"trial {t.number}: not retried again ({len(history)} attempts); re-run the command to retry")
            return
        fixed = {**t.system_attrs.get("fixed_params", {}), **t.params}
        system = {"fixed_params": fixed, "nb:retry_of": history, "nb:retry_reason": reason}
        if t.user_attrs.get("run"):
            system["nb:run"] = t.user_attrs["run"]
        keep = {k: t.user_attrs[k] for k in ("point", "axes", "group") if k in t.user_attrs}
        retry(lambda: study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=system,
                                                               user_attrs=keep)))

    # ------------------------------------------------------------------ claiming and running
    def claim(self) -> Slot | None:
        n = len(self.studies)
        for k in range(n):
            study, group = self.studies[(self._rr + k) % n]
            waiting = retry(lambda s=study: s.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            for t in sorted(waiting, key=lambda t: t.number):
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
        """A grid point finished by another trial (possible only after concurrent re-queues): its number."""
        if self.spec.kind == "search":
            return None
        for t in slot.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if t.user_attrs.get("point") == slot.point.index:
                return t.number
        return None

    def _suggest(self, slot: Slot) -> dict[str, Any]:
        trial = slot.trial
        if self.spec.kind != "search":
            for a in self.spec.axes:  # fixed params: records them (readable) in the trial
                trial.suggest_categorical(a.key, a.choices)
            return {}
        params = {}
        for key, s in self.spec.options["search_space"].items():
            if "choices" in s:
                from .spec import encode

                params[key] = decode(trial.suggest_categorical(key, [encode(c) for c in s["choices"]]))
            elif s["type"] == "int":
                params[key] = trial.suggest_int(key, int(s["low"]), int(s["high"]), log=s["log"],
                                                step=int(s.get("step") or 1))
            else:
                params[key] = trial.suggest_float(key, s["low"], s["high"], log=s["log"], step=s.get("step"))
        return params

    def run_slot(self, slot: Slot, trainer_fn: Callable[..., RunResult]) -> str:
        """Run one claimed trial and tell the storage. Returns a one-line summary."""
        trial, spec = slot.trial, self.spec
        dup = self._is_duplicate(slot)
        if dup is not None:
            trial.set_user_attr("skipped", f"duplicate of trial {dup}")
            retry(lambda: slot.study.tell(trial, state=TrialState.FAIL))
            return f"trial {trial.number} skipped (point already done by trial {dup})"
        params = self._suggest(slot)
        frozen = self.storage.get_trial(trial._trial_id)
        run = frozen.system_attrs.get("nb:run")
        is_retry = run is not None
        if run is None:
            slug = slot.point.slug(spec.axes)
            run = f"{slug}-t{trial.number:03d}" if spec.kind == "search" else f"t{trial.number:04d}-{slug}"
        cfg = from_dict(spec.trial_dict(slot.point, params, run=run, runtime=self.runtime))
        run_dir = Path(cfg.trainer.log_dir) / cfg.experiment / run
        for k, v in {"run": run, "run_dir": str(run_dir), "config": to_dict(cfg), "params": params}.items():
            trial.set_user_attr(k, v)
        resume = is_retry and ((run_dir / "last.ckpt").exists() or (run_dir / "result.json").exists())
        trial.set_user_attr("resumed", resume)
        label = slot.point.label(spec.axes) + (" " + " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float)
                                                              else f"{k.split('.')[-1]}={v}"
                                                              for k, v in params.items()) if params else "")
        self.log(f"trial {trial.number} started: {label}" + (" (resuming)" if resume else ""))
        pruning = None
        if spec.pruner.get("name", "none") != "none":
            from .pruning import OptunaPruning  # imports Lightning

            pruning = OptunaPruning(trial, spec.metric)
        t_start = time.time()
        with Heartbeat(self.storage, trial._trial_id, float(spec.heartbeat["interval"])):
            try:
                result = trainer_fn(cfg, callbacks=[pruning] if pruning else None, resume=resume)
            except optuna.TrialPruned as e:
                self._record_pruned(trial, pruning, cfg, run_dir, time.time() - t_start)
                self._tell(slot, state=TrialState.PRUNED)
                return f"trial {trial.number} {label}: {e}"
            except (KeyboardInterrupt, SystemExit) as e:  # e.g. Lightning's SIGTERMException (a SystemExit)
                self._interrupt(slot, f"interrupted ({type(e).__name__}); re-queued")
                raise
            except Exception as e:  # noqa: BLE001  a crashed run is recorded, and the sweep goes on
                trial.set_user_attr("error", "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:])
                trial.set_user_attr("traceback", traceback.format_exc()[-8000:])
                self._tell(slot, state=TrialState.FAIL)
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                return f"trial {trial.number} {label}: FAILED ({type(e).__name__}: {e})"
            if result.status == "interrupted":
                self._interrupt(slot, "run interrupted by a signal (checkpoint saved)")
                self.interrupted = True
                return f"trial {trial.number} {label}: interrupted; re-run the command to continue it"
            try:
                value = self._record(trial, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                value = None
            if value is not None:
                self._tell(slot, value=value)
            else:
                self.my_trials.discard(trial._trial_id)
                self.log(f"trial {trial.number} was failed by another worker meanwhile; its retry counts instead")
        m = result.final.get(spec.metric)
        what = (f"diverged at step {result.diverged_step}" if result.diverged
                else f"{spec.metric} {m:.4g}" if m is not None else result.status)
        return f"last: #{trial.number} {label} -> {what} ({result.wall_time:.1f}s)"

    def _tell(self, slot: Slot, value: float | None = None, state: TrialState | None = None) -> None:
        try:
            retry(lambda: slot.study.tell(slot.trial, value, state=state))
        except optuna.exceptions.UpdateFinishedTrialError:
            self.log(f"trial {slot.trial.number} was failed by another worker (no heartbeat seen); its retry "
                     f"counts, this result is dropped")
        finally:
            self.my_trials.discard(slot.trial._trial_id)

    def _interrupt(self, slot: Slot, reason: str) -> None:
        try:
            slot.trial.set_user_attr("error", reason)
            self._tell(slot, state=TrialState.FAIL)
            self._requeue(slot.study, self.storage.get_trial(slot.trial._trial_id), reason)
        except Exception:  # noqa: BLE001  best effort while shutting down; the reaper covers the rest
            pass

    def objective_value(self, result: RunResult) -> float:
        worst = -math.inf if self.spec.direction == "maximize" else math.inf
        if result.diverged:
            return worst
        src = result.final if self.spec.metric_at == "final" else result.best
        v = _finite(src.get(self.spec.metric))
        return worst if v is None else v

    def _record(self, trial: optuna.Trial, r: RunResult) -> float:
        """Store the run's record in the trial's user attributes (JSON only) and return the objective value."""
        max_steps = int((r.config.get("trainer") or {}).get("max_steps") or max(r.steps, 1))
        attrs = {
            "status": r.status, "diverged": r.diverged, "diverged_step": r.diverged_step, "steps": r.steps,
            "final": {k: _finite(v) for k, v in r.final.items()},
            "best": {k: _finite(v) for k, v in r.best.items()},
            "steps_to_target": r.steps_to_target, "time_to_target": _finite(r.time_to_target),
            "train_loss_auc": _finite(r.train_loss_auc), "wall_time": _finite(r.wall_time),
            "throughput": _finite(r.throughput), "run_dir": r.run_dir,
            "history": compact_history(r.history, max_steps),
        }
        if r.config:
            attrs["config"] = r.config
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return self.objective_value(r)

    def _record_pruned(self, trial: optuna.Trial, pruning, cfg, run_dir: Path, wall: float) -> None:
        attrs = {"status": "pruned", "diverged": False, "steps": pruning.pruned_step, "wall_time": wall,
                 "run_dir": str(run_dir), "history": compact_history(pruning.history, cfg.trainer.max_steps)}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)

    # ------------------------------------------------------------------ the loop
    def work(self, poll: float | None = None) -> int:
        """Claim and run trials until none is waiting or running. Returns 0, or 130 if interrupted."""
        trainer_fn = load_trainer(self.spec.trainer_fn)
        poll = poll if poll is not None else min(2.0, float(self.spec.heartbeat["interval"]) / 2)
        waiting_msg = False
        while not self.interrupted and STOP.signum is None:
            self.reap_stale()
            slot = self.claim()
            if slot is None:
                c = self.counts()
                if c.running == 0 and c.waiting == 0:
                    break
                if not waiting_msg:
                    self.log(f"{c.running} trial(s) still running in other workers; waiting (re-queued if their "
                             f"worker dies)")
                    waiting_msg = True
                time.sleep(poll)
                continue
            waiting_msg = False
            last = self.run_slot(slot, trainer_fn)
            self.progress(last)
        if STOP.signum is not None and not self.interrupted:
            self.log(f"stopped by signal {STOP.signum}; run the same command again to continue")
        return 130 if self.interrupted or STOP.signum is not None else 0


def _spec_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _spec_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


# ---------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies (so `kill -9` of the sweep command does not leave workers)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _StopFlag:
    """SIGINT/SIGTERM between runs: claim nothing new and exit once the current trial is recorded (a run in progress
    handles the signal itself: it checkpoints, stops, and its trial is re-queued). A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


STOP = _StopFlag()


@contextlib.contextmanager
def _stop_on_signals():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, STOP) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _worker_main(spec: SweepSpec, url: str, runtime: dict, name: str, t0: float, done_at_start: int,
                 parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _stop_on_signals():
        sweep = Sweep(spec, url, runtime=runtime, worker=name)
        sweep.setup(create=False)
        sweep.t0, sweep.done_at_start = t0, done_at_start
        code = sweep.work()
    sys.exit(code)


def _run_workers(spec: SweepSpec, sweep: Sweep, runtime: dict, workers: int) -> int:
    """Start ``workers`` processes on the shared storage and wait for them. A SIGTERM to this process is passed on
    (Ctrl-C in a terminal reaches them directly); each stops after recording its current trial."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, name=f"w{i}",
                         args=(spec, sweep.url, runtime, f"w{i}", sweep.t0, sweep.done_at_start, os.getpid()))
             for i in range(workers)]
    for p in procs:
        p.start()
    forwarded = False
    try:
        while any(p.is_alive() for p in procs):
            if STOP.signum == signal.SIGTERM and not forwarded:
                for p in procs:
                    if p.is_alive() and p.pid:
                        os.kill(p.pid, signal.SIGTERM)
                forwarded = True
            for p in procs:
                p.join(timeout=0.5)
    except KeyboardInterrupt:  # a second Ctrl-C: stop them now (their trials are re-queued when found dead)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=60)
        return 130
    codes = [p.exitcode for p in procs]
    if STOP.signum is not None or any(c in (130, -signal.SIGTERM, -signal.SIGINT) for c in codes):
        return 130
    return 0 if all(c == 0 for c in codes) else 1


def run_sweep(spec: str | Path | dict | SweepSpec, storage: str | None = None, study_name: str | None = None,
              workers: int = 1, overrides: list[str] | dict[str, Any] | None = None, *, dry_run: bool = False,
              verbose: bool = True) -> SweepResult:
    """Run (or continue, or join) a sweep; return when no trial is left waiting or running.

    ``spec``: a sweep YAML path, a mapping, or a loaded ``SweepSpec``. ``storage``: a URL (default: the spec's, else
    ``sqlite:///<log_dir>/optuna.db``). ``workers``: processes on this machine; more machines join by running the
    same command against the same storage and study name. ``overrides``: run-config keys for every trial.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec, overrides=overrides, study_name=study_name, dry_run=dry_run)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runtime: dict[str, Any] = {}
    if workers > 1:  # share the cores instead of oversubscribing them
        runtime["trainer.threads"] = max(1, (os.cpu_count() or 1) // workers)
    sweep = Sweep(spec, storage, verbose=verbose, runtime=runtime, worker="" if workers == 1 else "main")
    sweep.setup(create=True)
    c = sweep.counts()
    sweep.log(f"storage {sweep.url}; {c.done}/{c.total} done, {c.waiting} queued; {workers} worker(s); "
              f"runs under {Path(spec.log_dir) / spec.study_name}")
    code = 0
    STOP.signum = None
    with _stop_on_signals():
        if workers == 1:
            try:
                code = sweep.work()
            except (KeyboardInterrupt, SystemExit):
                code = 130
        else:
            code = _run_workers(spec, sweep, runtime, workers)
    counts = sweep.counts()
    if code == 0 and counts.failed:
        code = 1
    names = [s.study_name for s, _ in sweep.studies]
    res = SweepResult(spec.study_name, sweep.url, spec.kind, counts, names, time.time() - sweep.t0, code)
    sweep.log(f"{'stopped' if code == 130 else 'finished'}: {counts.line()} in {fmt_time(res.elapsed)}"
              + (f"; {counts.failed} failed (see the trials' 'error' attribute; re-run to retry)"
                 if counts.failed else "")
              + (f"; {counts.duplicates} duplicate trial(s) ignored" if counts.duplicates else ""))
    return res


__all__ = ["Counts", "Sweep", "SweepResult", "run_sweep"]
