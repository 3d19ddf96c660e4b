"""Liveness: which machine and process a worker is, whether a process is alive, and the trial heartbeat.

A worker writes a heartbeat (time and ``host:pid``) into its trial's system attributes every
``heartbeat.interval`` seconds; the reaper (``reaper.py``) fails trials whose heartbeat stopped changing or whose
process is gone. We keep our own heartbeat because Optuna's (RDB only, and tied to ``study.optimize``) does not
exist for journal storage.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import optuna

from .storage import retry


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
