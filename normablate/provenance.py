"""Provenance of a run: the code (git commit, dirty or not), the libraries and the machine it ran on, recorded in
its ``versions.json`` and ``RunResult.versions`` (and by the benchmarks: ``cpu_model``).

Hand-written: two ``git`` calls, ``importlib.metadata`` and ``/proc/cpuinfo``; no library adds anything here.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

from . import __version__


@functools.cache
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout this process imported normablate from, asked of git once per process: the
    code a process runs is the code it imported, so a sweep worker records the same state for every trial and
    pays the two git calls once, not per trial."""
    commit, dirty = "unknown", None
    repo = Path(__file__).resolve().parents[1]
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    return commit, dirty


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows), for the record of a run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    """Library versions, git state and machine (CPU model, usable CPUs) of a run. The libraries a run may not
    import itself (timm, datasets, optuna, torchmetrics) are read from their installed metadata: importing them
    only to ask took ~4 s of every run's start."""
    from importlib import metadata

    import lightning as L
    import torch

    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit, dirty = git_state()
    return {
        "normablate": __version__, "git_commit": commit, "git_dirty": str(dirty), "python": sys.version.split()[0],
        "platform": platform.platform(), "torch": torch.__version__, "lightning": L.__version__,
        "cpu": cpu_model(), "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count()),
        **{dist: installed(dist) for dist in ("torchmetrics", "timm", "datasets", "optuna")},
    }
