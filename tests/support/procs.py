"""Child processes of the tests, bounded: each starts in its own process group (session), and the whole group is
killed when the helper returns or times out, so a DDP rank, a sweep worker or a shell's child can never outlive
its test (an orphaned rank once kept a core busy after its test failed)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to every process left in ``proc``'s group (started with ``start_new_session``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone
        pass


def run_bounded(args: list[str], *, timeout: float, check: bool = False, capture_output: bool = False,
                **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a process group of its own that is killed on the way out: on a timeout every process of
    the group (not only the first, as ``subprocess.run`` does) and then ``TimeoutExpired``; after a normal exit,
    any process the child left behind."""
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    proc = subprocess.Popen(args, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise
    finally:
        kill_group(proc)
        if proc.poll() is None:  # an exception other than the timeout (KeyboardInterrupt)
            proc.wait()
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def signal_once_exists(args: list[str], path: Path, sig: int, log: Path, *, cwd: Path,
                       timeout: float = 600) -> tuple[int, str]:
    """Start ``args`` (output to the file ``log``: a full pipe would block it), send ``sig`` to its first process
    (rank 0 of a DDP run: the other ranks hear of it only through the run) once ``path`` exists, and wait for it:
    (exit code, output). Fails if ``path`` never appears within ``timeout`` s; the group is killed on the way out."""
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert path.exists(), f"{path} did not appear (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
        if proc.poll() is None:
            proc.wait()
    return proc.returncode, log.read_text()
