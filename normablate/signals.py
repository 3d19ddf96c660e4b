"""SIGINT/SIGTERM as a stop request: one flag class and one context manager, for ``train`` and the sweep.

A handler only sets a flag; the run reads it at its next step boundary (so its checkpoint is consistent) and a
sweep worker between trials. A second Ctrl-C raises ``KeyboardInterrupt`` (give up waiting). The sweep's
process-wide flag is ``STOP`` (its workers and the sweep command install it). A stop crosses nesting both ways: a
run started inside a worker inherits a stop already requested of it, and a stop requested of the run after its last
step boundary (during its final validation or its test: the run completes) is handed back to the worker's flag when
the run's handler is removed, so the worker claims nothing more. Ground floor: imports nothing of normablate.

Hand-written: ``signal.signal`` does the work; what is ours is the flag and the restore-on-exit.
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REFUSED = 2  # a sweep worker's exit status for an error the user must act on (not restarted; the sweep exits 2)


class StopRequest:
    """Set from a signal handler; read at the next step boundary (runs) or between trials (sweep workers)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received so far (a supervisor passes each new one on: supervise.run_workers)

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        self.count += 1
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: give up waiting
            raise KeyboardInterrupt
        self.signum = signum

    def relay(self) -> Callable[[], bool]:
        """For a supervisor that passes each stop on to its children (``supervise.run_workers``, a DDP trial's
        parent): a check that is true when a signal came since it was last true (several in between: true once),
        and at its first call for a stop already requested before the relay was made (not passed on yet). A child
        that missed one signal gets the next."""
        passed = self.count if self.signum is None else self.count - 1

        def due() -> bool:
            nonlocal passed
            if self.signum is None or self.count <= passed:
                return False
            passed = self.count
            return True
        return due


STOP = StopRequest()  # the sweep's flag: the sweep command and each worker process install it


@contextlib.contextmanager
def stop_on_signals(request: StopRequest | None = None) -> Iterator[StopRequest]:
    """Install ``request`` (default: a new ``StopRequest``) for SIGINT and SIGTERM; restore the previous handlers on
    exit. A stop already requested of the caller's handler (a sweep worker signalled while it was setting this run
    up) carries over, so the run stops at its first step boundary, not after the whole run; and a stop requested of
    ``request`` is handed back to the caller's handler on exit (a run signalled after its last step boundary
    completes, and the worker around it must still stop). Outside the main thread (where Python allows no handler)
    it installs nothing and yields the request unset."""
    request = StopRequest() if request is None else request
    previous: list = []
    try:
        with _installed(request) as previous:
            for h in previous:
                if request.signum is None and h is not request and getattr(h, "signum", None) is not None:
                    request.signum = h.signum
            yield request
    finally:  # after the restore: a signal meanwhile went to the caller's handler itself
        if request.signum is not None:
            for h in previous:
                if isinstance(h, StopRequest) and h is not request and h.signum is None:
                    h.signum = request.signum


class Interrupted(KeyboardInterrupt):
    """A stop that ends at once what is under way (``interrupt_on_signals``): a ``KeyboardInterrupt``, so every
    caller that handles Ctrl-C handles it (the CLI: one line, exit 130)."""


@contextlib.contextmanager
def interrupt_on_signals(request: StopRequest) -> Iterator[None]:
    """For work with nothing to save, such as a sweep's set-up before any trial starts: SIGINT or SIGTERM records the
    stop in ``request`` and raises ``Interrupted`` at once, whatever is under way (a storage retry loop, a download).
    Restores the previous handlers on exit; outside the main thread it installs nothing."""
    def handler(signum, frame) -> None:  # noqa: ARG001
        request.count += 1
        request.signum = signum
        raise Interrupted(signum)

    with _installed(handler):
        yield


@contextlib.contextmanager
def _installed(handler) -> Iterator[list]:
    """``handler`` for SIGINT and SIGTERM for the block; yields the handlers it replaced (none outside the main
    thread, where Python allows no handler: there it installs nothing). They are restored with both signals blocked,
    so a signal meanwhile reaches the restored handler, not one half-removed."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield list(previous.values())
    finally:
        with _blocked():
            for s, h in previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def _blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread for the block (nothing where there are no signal masks)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (block them in this thread) while a child process is started. The child starts with
    them blocked (a signal mask survives fork and exec), so a terminal's Ctrl-C, or a stop passed on, that reaches it
    while it starts up and imports waits for it, not a ``KeyboardInterrupt`` traceback or a silent death, until it
    calls ``release()`` with its own handler in place. In this process the block is on this thread only: another
    thread may take a signal meanwhile; the rest arrive when the block ends. (CPython starts its multiprocessing
    resource tracker the same way, and unblocks both signals after: it is started first here, since a spawn would
    start it inside the block.) Where there are no signal masks (Windows) it holds nothing."""
    if hasattr(signal, "pthread_sigmask"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    with _blocked():
        yield


def release() -> None:
    """In a child started under ``held()``: deliver the signals held since its start, to the handler it has now."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: get ``signum`` when the parent process dies, so a ``kill -9`` of the sweep command leaves no child
    behind (SIGTERM, the default: a sweep worker stops as if asked; SIGKILL: a child with nothing to save). The
    caller checks ``os.getppid()`` after it, for a parent that died before this took effect."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
