"""Helpers of the sweep tests: a dry-run spec, its storage, waiting on and spawning sweep processes."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from normablate.sweep.storage import open_storage

ROOT = Path(__file__).resolve().parents[2]  # the repository
DRY = "normablate.sweep.dryrun:train"
BASE = {
    "model": {"backbone": "vgg11", "norm": "bn", "width": 0.125},
    "data": {"source": "synthetic", "batch_size": 32, "train_limit": 512, "val_limit": 256},
    "optim": {"lr": 0.1},
    "trainer": {"max_steps": 20, "val_every": 10},
}
ATTRS = ("config", "final", "best", "steps_to_target", "time_to_target", "diverged", "diverged_step", "wall_time",
         "throughput", "train_loss_auc", "status", "run_dir", "history")


def make_spec(tmp_path: Path, grid: dict | None = None, **kw) -> dict:
    d = {"kind": "lr_sensitivity", "study_name": "t", "base": copy.deepcopy(BASE), "log_dir": str(tmp_path / "logs"),
         "trainer_fn": DRY, "heartbeat": {"interval": 1, "grace": 6},
         "grid": grid or {"model.norm": ["bn", "none"], "optim.lr": [0.03, 0.1, 1.0], "seed": [0, 1]}}
    d.update(kw)
    return d


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"


def trials_of(url: str, name: str = "t") -> list[optuna.trial.FrozenTrial]:
    """The study's trials. A database storage's connections are closed before it returns: a test that polls
    several times a second otherwise leaves each poll's engine to the cyclic garbage collector, and a throwaway
    PostgreSQL server (100 connections) once refused the sweep under test with "too many clients"."""
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        engine = getattr(storage, "engine", None)  # (RDB storages; a journal holds no connection)
        if engine is not None:
            engine.dispose()


def trials_so_far(url: str, name: str = "t") -> list[optuna.trial.FrozenTrial]:
    """The study's trials, or [] while a sweep just started has not created it yet (in whatever storage)."""
    try:
        return trials_of(url, name)
    except Exception:  # noqa: BLE001  (the study or the storage's schema is not there yet)
        return []


def worker_pid(t: optuna.trial.FrozenTrial) -> int | None:
    """The pid of the sweep worker that claimed trial ``t`` (None before one has)."""
    return (t.system_attrs.get("nb:worker") or {}).get("pid")


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}\n{out}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def one_complete_per_point(trials, n_points: int) -> dict[int, optuna.trial.FrozenTrial]:
    per = Counter(t.user_attrs["point"] for t in trials if t.state == TrialState.COMPLETE)
    assert sorted(per) == list(range(n_points)), per
    assert set(per.values()) == {1}, f"a grid point has several COMPLETE trials: {per}"
    return {t.user_attrs["point"]: t for t in trials if t.state == TrialState.COMPLETE}


def spawn_sweep(spec_path: Path, *args: str, delay: float) -> subprocess.Popen:
    env = {**os.environ, "NORMABLATE_DRYRUN_DELAY": str(delay), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "normablate.sweep", "--config", str(spec_path), "--no-report",
                             *args], cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
