"""Process supervision: worker processes on this machine and dying with the parent.

``run_workers`` starts N spawned processes on the shared storage and waits for them; SIGINT/SIGTERM between
runs (``normablate.signals.STOP``) make every worker stop claiming and exit once its current trial is recorded (a
run in progress handles the signal itself: it checkpoints, stops, and its trial is re-queued); a second Ctrl-C
aborts at once. On Linux a worker gets SIGTERM when its parent dies, so ``kill -9`` of the sweep command does not
leave workers behind. The worker's own code (``runner.worker_main``) is handed in as ``target``: supervision
imports nothing of the sweep above it.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..signals import REFUSED, STOP, held

if TYPE_CHECKING:  # (types only: not imported at run time)
    from .spec import SweepSpec


class SweepView(Protocol):
    """What supervision reads of a running ``runner.Sweep`` (a protocol: supervise imports nothing from runner)."""

    url: str
    t0: float
    done_at_start: int
    board: Any  # the live progress board, or None

    def log(self, msg: str) -> None: ...

WORKER_MEMORY = 1 << 30  # bytes one worker needs at least: an interpreter with torch, Lightning and Optuna
#                          imported (0.83 GB peak RSS measured) plus a small run


def check_workers(workers: int) -> None:
    """Refuse (``ConfigError``, before anything is spawned) more workers than this machine can run at once: one per
    usable CPU core, and ``WORKER_MEMORY`` each out of the memory available now."""
    from ..errors import ConfigError
    from ..footprint import available_memory  # (MemAvailable, or the cgroup's limit when lower)

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    avail, _ = available_memory()
    by_memory = max(1, avail // WORKER_MEMORY) if avail is not None else cores
    limit = min(cores, by_memory)
    if workers > limit:
        mem = f"{avail / 2**30:.1f} GiB memory available" if avail is not None else "memory unknown"
        raise ConfigError(f"--workers {workers} is more than this machine can run at once: {cores} usable CPU "
                          f"core(s) and {mem} ({WORKER_MEMORY / 2**30:.0f} GiB per worker) allow at most {limit}; use "
                          f"--workers {limit} or fewer (other machines can join with the same command and --storage)")


class QueueSink:
    """A worker's progress board: its log lines and its trial's progress events go to the sweep command's ``Board``
    (normablate/progress.py) through a queue. ``close`` (at the worker's exit) waits a bounded time for what is
    still queued to reach the sweep command (its last lines: a trial interrupted and re-queued, the stop); the exit
    itself never waits on the queue (a sweep command that is gone reads nothing)."""

    def __init__(self, queue) -> None:
        self.queue = queue
        queue.cancel_join_thread()

    def update(self, event: dict) -> None:
        with contextlib.suppress(Exception):
            self.queue.put_nowait(event)

    def close(self, timeout: float = 10.0) -> None:
        """No more events; wait up to ``timeout`` s for the queued ones to be written to the pipe. (CPython's
        ``Queue`` has no bounded flush: its ``join_thread`` waits forever, so we join its feeder thread, a private
        attribute, with a timeout; without one there is nothing to wait for.)"""
        with contextlib.suppress(Exception):
            self.queue.close()
            feeder = getattr(self.queue, "_thread", None)
            if feeder is not None:
                feeder.join(timeout)


def run_workers(spec: "SweepSpec", sweep: SweepView, runtime: dict, workers: int,
                max_restarts: int | None = None, *, target: Callable[..., None]) -> int:
    """Start ``workers`` processes on the shared storage and wait for them. A SIGTERM or SIGINT to this process is
    passed on as SIGTERM, each one again (Ctrl-C in a terminal also reaches them directly); each stops after recording
    its current trial.

    A worker that dies (killed, out of memory, a crash) while the sweep is not being stopped is replaced by a new
    one under the same name (its trial is failed and re-queued by the reaper, then resumed from ``last.ckpt``), at
    most ``max_restarts`` times in all (default 2 per worker). Returns 130 when stopped by a signal, 1 when workers
    kept dying beyond that budget, else 0: whether every point is done is the study's to say (``run_sweep``).
    ``target``: a worker's entry point (a module-level function, so spawn can pickle it), called with ``(spec, url,
    runtime, name, t0, done_at_start, parent pid, progress queue)``. It starts with SIGINT and SIGTERM held
    (``signals.held``: a Ctrl-C while it imports is no traceback) and calls ``signals.release()`` once its own
    handler is in place."""
    ctx = mp.get_context("spawn")
    budget = 2 * workers if max_restarts is None else max_restarts
    progress = ctx.Queue() if sweep.board is not None else None  # the workers' log lines and progress events

    procs: dict[str, Any] = {}

    def start(name: str) -> None:
        p = ctx.Process(target=target, name=name,
                        args=(spec, sweep.url, runtime, name, sweep.t0, sweep.done_at_start, os.getpid(), progress))
        with held():  # it starts with SIGINT/SIGTERM held until its handler is in place (worker_main releases them)
            p.start()
            procs[name] = p  # (before the block ends: a second Ctrl-C held meanwhile finds it in procs)

    def drain() -> None:
        while progress is not None:
            try:
                event = progress.get_nowait()
            except (queue.Empty, OSError, EOFError, ValueError):
                return
            sweep.board.update(event)

    stop_due = STOP.relay()
    gave_up = False
    try:
        for i in range(workers):
            if STOP.signum is None:  # (stopped meanwhile: start no more; those started are asked below)
                start(f"w{i}")
        while any(p.is_alive() for p in procs.values()):
            if stop_due():  # each new signal is passed on, as SIGTERM: a worker that missed one gets the next; a
                #            `kill -INT` reaches them too (a terminal's Ctrl-C reaches them directly as well: SIGINT,
                #            then SIGTERM, is one stop)
                for p in procs.values():
                    if p.is_alive() and p.pid:
                        os.kill(p.pid, signal.SIGTERM)
            for name, p in list(procs.items()):
                p.join(timeout=0.5)
                drain()
                code = p.exitcode
                if code is None or code in (0, 130, REFUSED, -signal.SIGTERM, -signal.SIGINT) \
                        or STOP.signum is not None:
                    continue
                if budget <= 0:
                    if not gave_up:
                        sweep.log(f"worker {name} died (exit {code}); no restarts left, going on with the others")
                        gave_up = True
                    continue
                budget -= 1
                sweep.log(f"worker {name} died (exit {code}); starting a new one (its trial is re-queued, up to "
                          f"heartbeat.max_retry times per command, and resumes from its checkpoint)")
                start(name)
    except KeyboardInterrupt:  # a second Ctrl-C: stop them now (their trials are re-queued when found dead)
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        for p in procs.values():
            p.join(timeout=60)
            if p.is_alive():  # (one that never installed its handler holds SIGTERM: it cannot be asked)
                p.kill()
                p.join()
        return 130
    drain()
    codes = [p.exitcode for p in procs.values()]
    if STOP.signum is not None or any(c in (130, -signal.SIGTERM, -signal.SIGINT) for c in codes):
        return 130
    if REFUSED in codes:
        return REFUSED
    return 1 if gave_up else 0
