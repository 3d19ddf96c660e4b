"""Run a sweep: a work queue of Optuna trials shared by any number of workers, processes and machines.

The concerns live in their own modules; ``Sweep`` (one process's handle on a sweep) composes them:

    liveness.py   host id, pid checks, the trial heartbeat
    queue.py      creating/loading the studies, enqueueing every trial, claiming one, counting progress
    reaper.py     failing the trials of dead or silent workers and re-queueing them (they resume)
    trial.py      running one claimed trial and recording it in the trial's attributes
    supervise.py  worker processes, dying with the parent (signals: normablate/signals.py)

Study kinds (``normablate.studies``) decide what a trial's config is and, for grouped kinds (``search``), how its
hyperparameters are drawn; nothing here knows a kind by name.

Re-running the command continues the sweep: finished trials are never repeated, points whose trial failed are
enqueued again once at start-up, and a worker stops when no trial is waiting or running.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..errors import ConfigError, NormablateError
from ..signals import REFUSED, STOP, Interrupted, die_with_parent, interrupt_on_signals, release, stop_on_signals
from ..studies import StudyKind
from .ddp_trial import check_resources
from .liveness import HOST, Heartbeat, host_id, pid_alive
from .queue import ATTR, READY, Counts, QueueMixin, Slot
from .reaper import ReaperMixin
from .preflight import preflight, preflight_isolated
from .spec import Point, SweepSpec, load_spec
from .storage import display_url, normalize_url, open_storage
from .supervise import QueueSink, check_workers, run_workers
from .trial import HISTORY_POINTS, TrialMixin, compact_history, load_trainer

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DATA_MEMO = 2  # data set-ups whose decoded tensors a worker keeps in memory for its next trials (0: none)


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


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


class Sweep(QueueMixin, ReaperMixin, TrialMixin):
    """One process's handle on a sweep: creates/loads its studies, reaps dead trials, claims and runs trials."""

    def __init__(self, spec: SweepSpec, storage_url: str | None = None, *, verbose: bool = True,
                 runtime: dict[str, Any] | None = None, worker: str = "") -> None:
        self.spec = spec
        self.kind: StudyKind = spec.study
        self.url = normalize_url(storage_url or spec.storage, spec.log_dir)
        self.storage = open_storage(self.url, spec.log_dir)
        self.verbose = verbose
        self.runtime = runtime or {}  # config defaults for this machine (threads per worker)
        self.worker = worker
        self.points = spec.points()
        self.my_trials: set[int] = set()
        self.retried: list[tuple[int, str]] = []  # failed trials re-queued at start-up: (number, run folder)
        self._beats: dict[int, tuple[Any, float]] = {}  # trial id -> (last heartbeat value, local time first seen)
        self.interrupted = False
        self.t0 = time.time()
        self.done_at_start = 0
        self._rr = 0
        self.studies: list[tuple[optuna.Study, Point | None]] = []
        # live progress (normablate/progress.py): where this process's log lines and its trials' progress events go
        # (a Board in the sweep command, or a queue to it from a worker process); None: plain prints only
        self.board: Any = None

    # ------------------------------------------------------------------ set-up
    def log(self, msg: str) -> None:
        if self.verbose:
            prefix = f"[{self.spec.study_name}{'/' + self.worker if self.worker else ''}]"
            if self.board is not None:
                self.board.update({"log": f"{prefix} {msg}"})
            else:
                print(f"{prefix} {msg}", flush=True)

    def progress(self, last: str = "") -> None:
        c = self.counts()
        elapsed = time.time() - self.t0
        rate = (c.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        eta = (c.total - c.done) / rate if rate > 0 else None
        self.log(f"{c.line()} | elapsed {fmt_time(elapsed)} | ETA {fmt_time(eta) if c.done < c.total else '0:00'}"
                 + (f" | {last}" if last else ""))
        self.tell_board(c, eta)

    def tell_board(self, c: Counts, eta: float | None) -> None:
        """The study's line of the live progress board: done/total, ETA (progress.Board refines it from the running
        trials' own ETAs)."""
        if self.board is not None and self.verbose:
            self.board.update({"study": f"[{self.spec.study_name}] {c.done}/{c.total} trials done",
                               "remaining": c.total - c.done, "eta": eta,
                               "done_since_start": c.done - self.done_at_start})

    def work(self, poll: float | None = None) -> int:
        """Claim and run trials until none is waiting or running. Returns 0, or 130 if interrupted.

        Meanwhile this process keeps the decoded data of its last ``DATA_MEMO`` data configs in memory
        (``normablate.data.cache.keep_in_memory``), so a later trial on the same data does not read the cache file
        again; dropped when the loop ends."""
        from ..data import cache as data_cache  # (imports torch: only a process that runs trials gets here)

        import torch

        previous = data_cache.keep_in_memory(DATA_MEMO)
        threads = torch.get_num_threads()  # each trial starts from this process's own count: a trial that set or
        try:  # restored another (a resumed one: runfolder.py) does not leak it to the next trial or the caller
            return self._work(poll, threads)
        finally:
            data_cache.keep_in_memory(previous)
            torch.set_num_threads(threads)

    def _work(self, poll: float | None, threads: int) -> int:
        import torch

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
            torch.set_num_threads(threads)
            last = self.run_slot(slot, trainer_fn)
            if self.board is not None:  # this worker's live line goes until its next trial starts
                self.board.update({"worker": self.worker or "w0", "done": True})
            self.progress(last)
        if STOP.signum is not None and not self.interrupted:
            self.log(f"stopped by signal {STOP.signum}; run the same command again to continue")
        return 130 if self.interrupted or STOP.signum is not None else 0


def worker_main(spec: SweepSpec, url: str, runtime: dict, name: str, t0: float, done_at_start: int,
                parent: int, progress=None) -> None:
    """A worker process of a multi-worker sweep (``supervise.run_workers``' target): claim and run trials until
    none is left or a signal asks it to stop."""
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sink = QueueSink(progress) if progress is not None else None
    with stop_on_signals(STOP):
        release()  # a Ctrl-C or a stop that came while it imported (held: supervise.run_workers) lands here now
        try:
            sweep = Sweep(spec, url, runtime=runtime, worker=name)
            sweep.board = sink
            sweep.setup(create=False)
            sweep.t0, sweep.done_at_start = t0, done_at_start
            code = sweep.work()
        except NormablateError as e:  # full disk, corrupt or lost storage: one line, and no restart (exit 2)
            if os.environ.get("NORMABLATE_DEBUG", "") not in ("", "0"):
                raise
            print(f"error: [{name}] {e}", file=sys.stderr, flush=True)
            sys.exit(REFUSED)
        finally:  # its last log lines (a trial re-queued, the stop) reach the sweep command, also on the way out
            if sink is not None:
                sink.close()
    _cheap_exit(sweep)
    sys.exit(code)


def _cheap_exit(sweep: Sweep) -> None:
    """Make the worker's exit cheap (the sweep command waits for its last worker): close the storage's database
    connections now, then ``gc.freeze()`` so that the interpreter's final garbage collections do not walk the
    millions of objects torch and Lightning created (1.5-2 s per worker on a loaded 2-core machine, measured: ~0.4 s
    after). Everything else exit does is unchanged (atexit handlers, flushing stdout/stderr, objects freed by
    reference counting); only objects in reference cycles are left to the OS, as after ``kill``, which a worker
    must survive anyway: its trials are all recorded by now."""
    with contextlib.suppress(Exception):
        sweep.storage.remove_session()  # (RDB storages; a journal file storage holds no open connection)
    with contextlib.suppress(Exception):
        sweep.storage.engine.dispose()
    gc.freeze()


def run_sweep(spec: str | Path | dict | SweepSpec, storage: str | None = None, study_name: str | None = None,
              workers: int = 1, overrides: list[str] | dict[str, Any] | None = None, *, dry_run: bool = False,
              verbose: bool = True) -> SweepResult:
    """Run (or continue, or join) a sweep; return when no trial is left waiting or running.

    ``spec``: a sweep YAML path, a mapping, or a loaded ``SweepSpec``. ``storage``: a URL (default: the spec's, else
    ``sqlite:///<log_dir>/optuna.db``). ``workers``: processes on this machine; more machines join by running the
    same command against the same storage and study name. ``overrides``: run-config keys for every trial.

    SIGINT/SIGTERM: trials stop at their next step boundary, checkpointed and re-queued, and the result's
    ``exit_code`` is 130; a stop during set-up or the preflight starts nothing (130 too); a stop while the storage
    is being opened (a server that does not answer) raises ``signals.Interrupted``, a ``KeyboardInterrupt``.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec, overrides=overrides, study_name=study_name, dry_run=dry_run)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    check_resources(spec, workers)  # DDP trials: devices x workers fit this machine (before any trial runs)
    check_workers(workers)  # cores and memory of this machine (before anything is opened or spawned)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runtime: dict[str, Any] = {}
    STOP.signum = None
    with stop_on_signals(STOP):
        with interrupt_on_signals(STOP):  # opening the storage writes nothing: a stop ends it at once (a server
            sweep = Sweep(spec, storage, verbose=verbose, runtime=runtime,  # that does not answer is retried for
                          worker="" if workers == 1 else "main")  # minutes): signals.Interrupted, exit 130
        sweep.setup(create=True)  # (under the flag: creating a study is several writes, all made before a stop)
        c = sweep.counts()
        if workers > max(1, c.waiting):  # no more workers than trials waiting to be claimed
            sweep.log(f"--workers {workers}: only {c.waiting} trial(s) waiting; starting {max(1, c.waiting)}")
            workers = max(1, c.waiting)
        if workers > 1:  # share the cores instead of oversubscribing them (a DDP trial splits them over its ranks)
            runtime["trainer.threads"] = max(1, (os.cpu_count() or 1) // workers)
            sweep.runtime = runtime
        else:
            sweep.worker = ""
        sweep.log(f"storage {display_url(sweep.url)}; {c.done}/{c.total} done, {c.waiting} queued; {workers} "
                  f"worker(s); runs under {Path(spec.log_dir) / spec.study_name}")
        if c.done < c.total and STOP.signum is None:  # one trial's data and model first, so a bad source is one
            try:  # line, not N crashes; it saves nothing, so a stop ends it at once (a download, a decode)
                with interrupt_on_signals(STOP):
                    line = preflight(spec) if workers == 1 else preflight_isolated(spec)  # (no Lightning in a
                if line:  # supervisor)
                    sweep.log(line)
            except Interrupted:
                pass  # (STOP is set: nothing starts)
        code = 130  # stopped during or just after set-up: no trial started
        if STOP.signum is None:
            if verbose:  # live progress (progress.py): a line per worker's trial and the study's
                from ..progress import Board

                sweep.board = Board()
                sweep.tell_board(c, None)
            try:
                if workers == 1:
                    try:
                        code = sweep.work()
                    except (KeyboardInterrupt, SystemExit):
                        code = 130
                else:
                    code = run_workers(spec, sweep, runtime, workers, target=worker_main)
            finally:
                if sweep.board is not None:
                    sweep.board.close()
                    sweep.board = None
    counts = sweep.counts()
    if code == 0 and (counts.failed or counts.done < counts.total):
        code = 1  # the exit status is the study's: 0 only when every point is done
    names = [s.study_name for s, _ in sweep.studies]
    res = SweepResult(spec.study_name, sweep.url, spec.kind, counts, names, time.time() - sweep.t0, code)
    sweep.log(f"{'stopped' if code == 130 else 'finished'}: {counts.line()} in {fmt_time(res.elapsed)}"
              + (f"; {counts.failed} failed (see the trials' 'error' attribute; re-run to retry)"
                 if counts.failed else "")
              + (f"; {counts.duplicates} duplicate trial(s) ignored" if counts.duplicates else "")
              + (f"; retried failed trial(s) {', '.join(str(n) for n, _ in sweep.retried)} in their own folders"
                 if sweep.retried else ""))
    return res


__all__ = ["ATTR", "HISTORY_POINTS", "HOST", "READY", "Counts", "Heartbeat", "Slot", "Sweep", "SweepResult", "compact_history",
           "host_id", "load_trainer", "pid_alive", "run_sweep"]
