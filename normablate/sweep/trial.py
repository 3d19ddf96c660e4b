"""Trial execution: run one claimed trial (``train(cfg)`` via the spec's ``trainer_fn``) and record it.

A trial with more than one rank (``trainer.devices > 1``) runs in a child process group (``ddp_trial.py``) and is
recorded exactly like a one-process trial.

Every trial stores in its user attributes (names the report reads; keep them stable, existing studies depend on
them): ``run``, ``run_dir``, ``config``, ``params``, ``resumed``, ``status``, ``diverged``, ``diverged_step``,
``steps``, ``final``, ``best`` (validation split), ``test``, ``test_at_best``, ``best_step`` (test split, see
``RunResult``), ``steps_to_target``, ``time_to_target``, ``train_loss_auc``, ``wall_time``,
``throughput``, ``history`` (compact curves, probe series included) and, for runs that probed, ``probes``
(each probe series' mean over the run), ``cpu_time`` (CPU seconds of the run, where known) and ``versions``
(libraries, git commit, CPU model). A crashed run stores ``error`` and ``traceback``.
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config import to_dict
from ..plugins import import_object
from ..provenance import git_state
from ..result import RunResult
from ..signals import STOP
from .ddp_trial import TrialProcess, needs_process, threads_per_rank, world_of
from .liveness import Heartbeat
from .queue import INTERRUPTED, Slot, retry_of
from .storage import StorageError, disk_full_message, is_disk_full, retry

HISTORY_POINTS = 256  # curves kept per metric in the trial record (downsampled by averaging)


def debugging() -> bool:
    """``--debug`` (the CLI exports it as ``NORMABLATE_DEBUG=1``, so workers see it too)."""
    return os.environ.get("NORMABLATE_DEBUG", "") not in ("", "0")


def load_trainer(path: str) -> Callable[..., RunResult]:
    """The spec's ``trainer_fn`` (``package.module:function``)."""
    return import_object(path, "trainer_fn")


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


class TrialMixin:
    """Suggesting, running and recording a trial (part of ``runner.Sweep``)."""

    def _suggest(self, slot: Slot) -> dict[str, Any]:
        trial = slot.trial
        if not self.kind.grouped:
            for a in self.spec.axes:  # fixed params: records them (readable) in the trial
                if a.key != "seed":
                    trial.suggest_categorical(a.key, a.choices)
                elif all(isinstance(v, int) and not isinstance(v, bool) for v in a.choices):
                    # an integer range, not categorical: a study's seeds may grow (queue.adds_seeds), and Optuna
                    # refuses a categorical parameter whose choices change within a study; an int's range may
                    trial.suggest_int("seed", min(a.choices), max(a.choices))
            return {}
        return self.kind.suggest(trial, self.spec.options)

    def run_slot(self, slot: Slot, trainer_fn: Callable[..., RunResult]) -> str:
        """Run one claimed trial and tell the storage. Returns a one-line summary."""
        trial, spec = slot.trial, self.spec
        dup = self._is_duplicate(slot)
        if dup is not None:
            trial.set_user_attr("skipped", f"duplicate of trial {dup}")
            retry(lambda: slot.study.tell(trial, state=TrialState.FAIL))
            return f"trial {trial.number} skipped (a duplicate of trial {dup}: same point, or same retry)"
        params = self._suggest(slot)
        frozen = self.storage.get_trial(trial._trial_id)
        run = frozen.system_attrs.get("nb:run")
        is_retry = run is not None
        if run is None:
            slug = slot.point.slug(spec.axes)
            run = f"{slug}-t{trial.number:03d}" if self.kind.grouped else f"t{trial.number:04d}-{slug}"
        cfg = spec.trial_config(slot.point, params, run=run, runtime=self.runtime)  # travels as this object
        ddp = needs_process(cfg, spec.trainer_fn)  # DDP: the trial runs in a child process group (ddp_trial.py)
        if ddp:  # the worker's threads are split over the trial's ranks
            own = spec.trial_dict(slot.point, params, run=run)["trainer"].get("threads")
            cfg.trainer.threads = threads_per_rank(cfg, own, self.runtime.get("trainer.threads"))
        run_dir = Path(cfg.trainer.log_dir) / cfg.experiment / run
        # git_commit: the code this worker runs, recorded at the start (versions, at the end, is missing from a trial
        # that was interrupted): a resumed study can then be continued at the commit it began with
        for k, v in {"run": run, "run_dir": str(run_dir), "config": to_dict(cfg), "params": params,
                     "git_commit": git_state()[0]}.items():
            trial.set_user_attr(k, v)
        resume = is_retry and ((run_dir / "last.ckpt").exists() or (run_dir / "result.json").exists())
        trial.set_user_attr("resumed", resume)
        if resume and spec.trial_dict(slot.point, params, run=run)["trainer"].get("threads") is None:
            # the worker's thread share (--workers) is a machine default, not the trial's: a resumed trial restores
            # the count its checkpoint ran with, whatever --workers is now (runfolder.py; recorded in resumes.jsonl)
            cfg.trainer.threads = None
        label = slot.point.label(spec.axes) + (" " + " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float)
                                                              else f"{k.split('.')[-1]}={v}"
                                                              for k, v in params.items()) if params else "")
        # a retry whose folder holds no checkpoint (the sweep re-run from another directory with a relative log_dir,
        # or the folder removed) trains from step 0: said, not silent, since the queue promised a resume
        fresh = (f" (retry of trial {frozen.system_attrs.get('nb:retry_of', ['?'])[-1]}: no checkpoint in {run_dir.resolve()}, "
                 f"so it starts again from step 0)") if is_retry and not resume else ""
        self.log(f"trial {trial.number} started: {label}" + (" (resuming)" if resume else fresh)
                 + (f" (DDP: {world_of(cfg)} processes x {cfg.trainer.threads} threads)" if ddp else ""))
        pruning, callbacks, run_fn = None, None, trainer_fn
        # every validation's metric is reported to the trial (optuna-dashboard's learning curves), with or without
        # a pruner; only a pruner asks should_prune (none: NopPruner, never asked)
        prune = spec.pruner.get("name", "none") != "none"
        if ddp:  # rank 0 of the child reports to this trial in the storage
            job = {"storage": self.url, "log_dir": spec.log_dir, "study": slot.study.study_name,
                   "trial_id": trial._trial_id, "metric": spec.metric, "pruner": spec.pruner,
                   "max_steps": self._pruner_max_steps(slot.point if self.kind.grouped else None)}
            run_fn = TrialProcess(spec.trainer_fn, job)
            pruning = run_fn.pruning
        else:
            from .pruning import OptunaPruning  # imports Lightning

            pruning = OptunaPruning(trial, spec.metric, prune=prune)
            callbacks = [pruning]
            if getattr(self, "board", None) is not None:  # live progress: step/total, metric, ETA (progress.py)
                from ..progress import step_reporter

                callbacks.append(step_reporter(self.board.update, spec.metric, worker=self.worker or "w0",
                                               trial=trial.number, label=label))
        t_start = time.time()
        with Heartbeat(self.storage, trial._trial_id, float(spec.heartbeat["interval"])):
            try:
                result = run_fn(cfg, callbacks=callbacks, resume=resume)
            except optuna.TrialPruned as e:
                try:
                    self._record_pruned(trial, pruning, cfg, run_dir, time.time() - t_start)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # (failed by another worker meanwhile: _tell says so)
                if not self._tell(slot, state=TrialState.PRUNED):
                    return f"trial {trial.number} {label}: dropped (failed by another worker meanwhile)"
                return f"trial {trial.number} {label}: {e}"
            except (KeyboardInterrupt, SystemExit) as e:  # e.g. Lightning's SIGTERMException (a SystemExit)
                self._interrupt(slot, f"interrupted ({type(e).__name__})")
                raise
            except Exception as e:  # noqa: BLE001  a crashed run is recorded, and the sweep goes on
                # (a worker whose trial another worker's reaper failed meanwhile gets its next storage write refused,
                # e.g. the pruning callback's report: that is no crash of the run, and the point has its retry)
                if (taken := self._taken_over(slot)) is not None:
                    self.log(taken)
                    return f"trial {trial.number} {label}: dropped (failed by another worker meanwhile)"
                line = getattr(e, "child_error", None) or "".join(traceback.format_exception_only(type(e), e))
                tb = getattr(e, "child_traceback", None) or traceback.format_exc()  # a DDP trial's: the child's
                full = is_disk_full(e) or "No space left on device" in line
                try:
                    trial.set_user_attr("error", line.strip()[-2000:])
                    trial.set_user_attr("traceback", tb[-8000:])
                    self._tell(slot, state=TrialState.FAIL)
                except StorageError:
                    if not full:
                        raise
                if full:  # every later trial would fail the same way: stop, one line (its checkpoint is kept)
                    raise StorageError(f"trial {trial.number} stopped: " + disk_full_message(e, str(run_dir)))
                if debugging():
                    print(tb, file=sys.stderr, flush=True)
                first = line.strip().splitlines()[-1] if line.strip() else type(e).__name__
                print(f"trial {trial.number} {label} failed: {first[:300]} (its traceback is in the trial's "
                      f"'traceback' attribute; --debug prints it)", file=sys.stderr, flush=True)
                return f"trial {trial.number} {label}: FAILED ({first[:300]})"
            if result.status == "interrupted":
                self._interrupt(slot, INTERRUPTED)
                self.interrupted = True
                return f"trial {trial.number} {label}: interrupted; re-run the command to continue it"
            try:
                value = self._record(trial, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                value = None
            if value is not None:
                self._tell(slot, value=value)
            else:
                self.log(self._taken_over(slot) or f"trial {trial.number}: its record was refused by the storage")
        m = result.final.get(spec.metric)
        what = (f"diverged at step {result.diverged_step}" if result.diverged
                else f"{spec.metric} {m:.4g}" if m is not None else result.status)
        return f"last: #{trial.number} {label} -> {what} ({result.wall_time:.1f}s)"

    def _tell(self, slot: Slot, value: float | None = None, state: TrialState | None = None) -> bool:
        """Report the trial's outcome; False (and a log line) when another worker's reaper failed it first."""
        try:
            retry(lambda: slot.study.tell(slot.trial, value, state=state))
            return True
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial."
            taken = self._taken_over(slot)
            if taken is None:
                raise
            self.log(taken)
            return False
        finally:
            self.my_trials.discard(slot.trial._trial_id)

    def _taken_over(self, slot: Slot) -> str | None:
        """None while this worker's trial is RUNNING in the storage; else another worker's reaper failed it meanwhile
        (its heartbeat looked silent for longer than ``heartbeat.grace``: a suspended machine, say), and this is the
        line saying so and what became of the point. The result this worker has for it is dropped: the reaper's
        retry, if it queued one, resumes from the run's checkpoint."""
        t = retry(lambda: self.storage.get_trial(slot.trial._trial_id))
        if t.state == TrialState.RUNNING:
            return None
        self.my_trials.discard(t._trial_id)
        queued = any(s.system_attrs.get("nb:retry_of", [])[-1:] == [t.number]
                     for s in retry(lambda: slot.study.get_trials(deepcopy=False)))
        return (f"trial {t.number} was failed by another worker meanwhile (no heartbeat seen for heartbeat.grace); "
                f"this worker's result for it is dropped; "
                + ("its retry resumes from the run's checkpoint" if queued else
                   "no retry of it is queued (yet): if none appears, re-run the command to retry it"))

    def _interrupt(self, slot: Slot, reason: str) -> None:
        """Fail a trial stopped by a signal and queue its retry, which resumes from its checkpoint; not when another
        worker failed it first (that one queued the retry). A stop (``STOP`` set: the worker got SIGINT/SIGTERM) is
        no failure of the point: its retry starts a fresh ``max_retry`` allowance (``retry_of(rerun=True)``), as a
        re-run of the command would give it. Any other interruption (a ``sys.exit`` in a trainer, a DDP rank's) is
        counted like a dead worker: past ``max_retry`` it is not re-queued, and its error says so."""
        ok = False
        try:
            frozen = self.storage.get_trial(slot.trial._trial_id)  # (params, run, retry chain: what a retry needs)
            stop = STOP.signum is not None
            refused = None if stop else self._retry_refused(frozen)
            try:
                slot.trial.set_user_attr("error", reason if refused is None else f"{reason}; {refused}")
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # failed by another worker meanwhile: the tell below says so
            if self._tell(slot, state=TrialState.FAIL):
                if refused is None:
                    retry(lambda: slot.study.add_trial(retry_of(frozen, reason, rerun=stop)))
                else:
                    self.log(f"trial {slot.trial.number}: {refused}")
            ok = True
        except Exception:  # noqa: BLE001  best effort while shutting down; the trial stays RUNNING or FAIL, and
            pass  # the reaper or a re-run of the command retries it
        finally:
            if not ok:
                self.log(f"trial {slot.trial.number}: stopped, but its retry could not be queued (storage error); "
                         f"re-run the command to continue it")

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
            # the test split (reported, never selected on); older trainer_fns return none
            "test": {k: _finite(v) for k, v in (getattr(r, "test", None) or {}).items()},
            "test_at_best": {k: _finite(v) for k, v in (getattr(r, "test_at_best", None) or {}).items()},
            "best_step": getattr(r, "best_step", None),
            "steps_to_target": r.steps_to_target, "time_to_target": _finite(r.time_to_target),
            "train_loss_auc": _finite(r.train_loss_auc), "wall_time": _finite(r.wall_time),
            "throughput": _finite(r.throughput), "run_dir": r.run_dir,
            "history": compact_history(r.history, max_steps),
        }
        if r.config:
            attrs["config"] = r.config
        cpu = getattr(r, "cpu_time", None)  # (a RunResult from an older trainer_fn has neither)
        if cpu is not None:
            attrs["cpu_time"] = _finite(cpu)
        if getattr(r, "versions", None):
            attrs["versions"] = r.versions
        if getattr(r, "num_classes", None):  # classification: the report's "at chance" rule needs it
            attrs["num_classes"] = int(r.num_classes)
        probes = getattr(r, "probes", None)  # (a RunResult from an older trainer_fn has none)
        if probes:
            attrs["probes"] = {k: _finite(v) for k, v in probes.items()}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return self.objective_value(r)

    def _record_pruned(self, trial: optuna.Trial, pruning, cfg, run_dir: Path, wall: float) -> None:
        attrs = {"status": "pruned", "diverged": False, "steps": pruning.pruned_step, "wall_time": wall,
                 "run_dir": str(run_dir), "history": compact_history(pruning.history, cfg.trainer.max_steps or max(pruning.pruned_step or 1, 1))}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)

    # ------------------------------------------------------------------ the loop
