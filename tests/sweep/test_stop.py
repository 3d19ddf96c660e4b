"""Stopping a sweep with SIGTERM: no signal is lost, whichever handler it lands in, and the workers' last lines are
printed.

A trial's run installs its own stop handler (``train`` does, through ``signals.stop_on_signals``); a signal that
lands there after the run's last step boundary (its final validation, its test) lets the run complete. These tests
hold the regressions of a real stop that did not stop (2026-12-06, the bn_momentum_gap study): the run absorbed the
signal and its worker claimed the next trial; the sweep command passed SIGTERM on only once, so a second SIGTERM did
nothing; and a stopping worker's log lines (its trial re-queued, its stop) were dropped at its exit.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from normablate.signals import STOP, release, stop_on_signals
from normablate.sweep import run_sweep
from normablate.sweep.dryrun import train as dry_train
from normablate.sweep.storage import open_storage
from normablate.sweep.supervise import QueueSink, run_workers

from support.procs import kill_group, run_bounded
from support.sweep import ROOT, make_spec, trials_of, wait_for

GRID = {"model.norm": ["bn", "none"], "optim.lr": [0.03, 0.1, 1.0], "seed": [0, 1]}  # 12 trials


def _first(cfg) -> bool:
    """True for the first run of the sweep to get here (an exclusive file under its log folder, so that every
    worker process agrees)."""
    log_dir = cfg["trainer"]["log_dir"] if isinstance(cfg, dict) else cfg.trainer.log_dir
    try:
        os.close(os.open(Path(log_dir) / "signalled", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def late_signal_trainer(cfg, callbacks=None, resume=False):
    """The dry-run trainer under its own stop handler, as ``train`` runs; the sweep's first run gets a SIGTERM after
    its last step (the run completes; nothing checks the flag any more)."""
    with stop_on_signals() as request:
        result = dry_train(cfg, callbacks, resume)
        if _first(cfg):
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGTERM  # (the run's handler took it, not the worker's)
    return result


def signal_the_sweep_trainer(cfg, callbacks=None, resume=False):
    """Once both workers have started a run, the first run to end sends SIGTERM to the sweep command; every run that
    ends after that, still inside its own stop handler, waits (bounded) for the SIGTERM the sweep command passes on
    to its worker. (Both started: a worker still importing when the SIGTERM comes dies by it, without its lines.)"""
    log_dir = Path(cfg["trainer"]["log_dir"] if isinstance(cfg, dict) else cfg.trainer.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"started-{os.getpid()}").touch()
    with stop_on_signals() as request:
        result = dry_train(cfg, callbacks, resume)
        if _first(cfg):
            wait_for(lambda: len(list(log_dir.glob("started-*"))) >= 2, 60, "both workers to start a run")
            os.kill(os.getppid(), signal.SIGTERM)
        wait_for(lambda: request.signum is not None, 10, "the SIGTERM passed on by the sweep command")
    return result


def mid_run_signal_trainer(cfg, callbacks=None, resume=False):
    """The first run gets a SIGTERM mid-run, under its own stop handler, and stops there (status "interrupted", as
    ``train`` returns it); later runs (the resumed one) complete."""
    result = dry_train(cfg, callbacks, resume)
    if _first(cfg):
        with stop_on_signals() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signum == signal.SIGTERM
        result.status = "interrupted"
    return result


def test_a_run_stopped_mid_run_is_requeued_with_a_fresh_retry_allowance(tmp_path):
    """A real stop (the signal lands in the run's handler and is handed back to the worker's flag) re-queues the
    trial with its attempts counted from the stop (``nb:rerun_at``), so stops never use up ``heartbeat.max_retry``;
    the next command resumes it first."""
    d = make_spec(tmp_path, grid=GRID, trainer_fn="test_stop:mid_run_signal_trainer")
    res = run_sweep(d, storage=str(tmp_path / "s.journal"), workers=1, verbose=False)
    assert res.exit_code == 130 and res.counts.done == 0
    waiting = sorted((t for t in trials_of(res.storage) if t.system_attrs.get("nb:retry_of")), key=lambda t: t.number)
    assert [(t.state, t.system_attrs["nb:retry_of"], t.system_attrs["nb:rerun_at"]) for t in waiting] == \
        [(TrialState.WAITING, [0], 1)]
    again = run_sweep(d, storage=str(tmp_path / "s.journal"), workers=1, verbose=False)
    assert again.exit_code == 0 and again.counts.done == 12 and len(trials_of(res.storage)) == 13


def test_a_signal_a_run_took_after_its_last_step_stops_the_sweep(tmp_path):
    """One worker (trials run in this process): the run completes and is recorded, and nothing after it starts."""
    d = make_spec(tmp_path, grid=GRID, trainer_fn="test_stop:late_signal_trainer")
    res = run_sweep(d, storage=str(tmp_path / "s.journal"), workers=1, verbose=False)
    assert res.exit_code == 130 and res.counts.done == 1  # before the fix: 12, the signal was lost
    assert Counter(t.state for t in trials_of(res.storage)) == {TrialState.COMPLETE: 1, TrialState.WAITING: 11}
    again = run_sweep(d, storage=str(tmp_path / "s.journal"), workers=1, verbose=False)
    assert again.exit_code == 0 and again.counts.done == 12 and len(trials_of(res.storage)) == 12  # none repeated


def test_a_stopped_multiworker_sweep_stops_every_worker_and_prints_their_last_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NORMABLATE_DRYRUN_DELAY", "0.5")
    d = make_spec(tmp_path, grid=GRID, trainer_fn="test_stop:signal_the_sweep_trainer")
    res = run_sweep(d, storage=str(tmp_path / "s.journal"), workers=2, verbose=True)
    out = capsys.readouterr().out
    # each worker finishes the trial it is in and claims no other (before the fix the runs took the signals, and the
    # workers went on)
    assert res.exit_code == 130 and res.counts.done <= 2, out
    for w in ("w0", "w1"):  # each worker's own last line, sent just before it exits
        assert f"[t/{w}] stopped by signal {int(signal.SIGTERM)}" in out, out


def _stubborn_worker(spec, url, runtime, name, t0, done_at_start, parent, progress):  # noqa: ARG001
    """A worker (``run_workers``' target) that misses the first SIGTERM, as one busy starting up would: it records
    each SIGTERM in a file and exits (130, stopped) at the second."""
    log = Path(runtime["log"])
    seen = []

    def on_term(signum, frame):  # noqa: ARG001
        seen.append(signum)
        with log.open("a") as f:
            f.write(f"{len(seen)}\n")
        if len(seen) == 2:
            os._exit(130)

    signal.signal(signal.SIGTERM, on_term)
    release()  # (a run_workers target starts with SIGINT/SIGTERM held, as worker_main does)
    signal.alarm(120)  # (bounded: if the test never signals it, SIGALRM ends it and the test fails, not hangs)
    with log.open("a") as f:
        f.write(f"ready {os.getpid()}\n")
    while True:
        signal.pause()


def test_each_signal_to_the_sweep_command_is_passed_on_as_sigterm(tmp_path):
    """`kill -INT`, then `kill -TERM`, to the sweep command: the worker gets SIGTERM twice (the first SIGINT was once
    kept by the sweep command; each SIGTERM after the first was dropped)."""
    log = tmp_path / "worker.log"
    view = SimpleNamespace(url="", t0=0.0, done_at_start=0, board=None, log=print)
    lines = lambda: log.read_text().split("\n")[:-1] if log.exists() else []  # noqa: E731
    killed = []

    def signaller():  # (the main thread waits in run_workers, where the handler runs)
        pid = None
        try:
            pid = int(wait_for(lambda: lines(), 60, "the worker to start")[0].split()[1])
            for n, signum in ((1, signal.SIGINT), (2, signal.SIGTERM)):
                os.kill(os.getpid(), signum)
                wait_for(lambda n=n: len(lines()) > n, 20, f"the worker to get SIGTERM #{n}")
        except AssertionError:
            killed.append(True)  # never passed on: end the worker so the test fails instead of hanging
            if pid is not None:
                os.kill(pid, signal.SIGKILL)

    STOP.signum = None
    t = threading.Thread(target=signaller)
    try:
        with stop_on_signals(STOP):
            t.start()
            code = run_workers(None, view, {"log": str(log)}, 1, target=_stubborn_worker)
    finally:
        t.join()
        STOP.signum = None
    assert not killed and lines()[1:] == ["1", "2"] and code == 130  # before the fix: only "1", then killed


def _chatty_worker(q, n):
    """Sends ``n`` events of 1 kB and an end mark through a ``QueueSink``, closes it and exits at once."""
    sink = QueueSink(q)
    for i in range(n):
        sink.update({"i": i, "pad": "x" * 1000})
    sink.update({"end": True})
    sink.close()


def test_a_worker_s_queued_lines_reach_the_sweep_command_before_it_exits():
    """Far more than a pipe holds is still queued when the worker returns; ``close`` waits until it is written
    (before, the queue's feeder thread was abandoned at exit and the tail of it was lost)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_chatty_worker, args=(q, 5000))
    p.start()
    got = []
    try:
        while not (got and "end" in got[-1]):
            got.append(q.get(timeout=30))
    finally:
        p.join(timeout=60)
    assert [e["i"] for e in got[:-1]] == list(range(5000)) and p.exitcode == 0


def test_a_ddp_trial_stopped_before_it_could_report_is_requeued_not_failed(tmp_path):
    """A DDP trial's rank 0 killed by the passed-on SIGTERM before its handler was installed (while importing) left
    no outcome and was recorded as FAILED ("killed, or out of memory?"); now it is an interruption (re-queued)."""
    from normablate.sweep.ddp_trial import TrialProcess, TrialProcessError

    missing = tmp_path / "outcome.json"
    with pytest.raises(TrialProcessError, match="left no outcome"):  # no stop asked of this worker: a real failure
        TrialProcess("normablate.train:train")._outcome(missing, -signal.SIGTERM)
    STOP.signum = signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        TrialProcess("normablate.train:train")._outcome(missing, -signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["preflight", "workers"])
def test_ctrl_c_while_the_sweep_starts_up_stops_it_in_one_line(tmp_path, moment):
    """A terminal's Ctrl-C (SIGINT to the whole process group) while the sweep command runs its preflight in a
    child, or while its workers import: exit 130 with the stop line, no traceback from any process, nothing failed,
    and the same command then runs every trial. Before, the preflight child and a worker still importing each
    printed a KeyboardInterrupt traceback, and the sweep command, whose handler was not installed yet during its
    set-up and preflight, ended on the preflight child's death with a misleading error."""
    import yaml

    d = make_spec(tmp_path, grid={"seed": [0, 1]}, trainer_fn="normablate.train:train", study_name="cc", kind="grid")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    args = [sys.executable, "-m", "normablate.sweep", "--config", str(tmp_path / "s.yaml"), "--no-report",
            "--storage", str(tmp_path / "s.journal"), "--workers", "2"]
    log = tmp_path / "out.log"
    trigger = "storage " if moment == "preflight" else "preflight: "
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: trigger in log.read_text(), 300, f"the line {trigger!r}", proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 130, log.read_text()
    finally:
        kill_group(proc)
        if proc.poll() is None:
            proc.wait()
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "interrupted" in out and "run the same command again" in out and "ended without an answer" not in out, out
    assert not [t for t in trials_of(str(tmp_path / "s.journal"), "cc") if t.state == TrialState.FAIL]
    again = run_bounded(args, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert Counter(t.state for t in trials_of(str(tmp_path / "s.journal"), "cc")) == {TrialState.COMPLETE: 2}


@pytest.mark.slow
def test_a_stop_while_the_storage_does_not_answer_ends_the_sweep_at_once(tmp_path):
    """SIGTERM while the sweep waits for a database that does not answer (nothing listens on the port; patience
    120 s): it ends within seconds with exit 130 and one line, not after the whole patience (exit 2), nor killed by
    the signal's default action (exit -15, before the handler was installed at set-up)."""
    import yaml

    d = make_spec(tmp_path, grid={"seed": [0]}, study_name="db", kind="grid")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    args = [sys.executable, "-m", "normablate.sweep", "--config", str(tmp_path / "s.yaml"), "--no-report",
            "--storage", "postgresql://nobody@127.0.0.1:1/none"]
    log = tmp_path / "out.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "NORMABLATE_STORAGE_PATIENCE": "120"})
    try:
        wait_for(lambda: "storage unavailable" in log.read_text(), 60, "the storage's retry warning", proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)  # (before: the rest of the 120 s patience, then exit 2)
    finally:
        kill_group(proc)
        if proc.poll() is None:
            proc.wait()
    out = log.read_text()
    assert rc == 130 and "Traceback" not in out and "interrupted" in out and "run the same command again" in out, out


@pytest.mark.parametrize("kind", ["lr_sensitivity", "search"])
def test_a_stop_while_the_study_is_created_leaves_a_study_the_same_command_resumes(tmp_path, monkeypatch, kind):
    """SIGTERM between the study's first write and its last (meta, group studies, queued trials, READY): the
    creation completes, nothing starts (exit 130), and the same command runs every trial, with no "not made by
    normablate sweep" refusal, no missing group study and no wait for a READY that never comes (each seen when a stop
    during creation raised at once)."""
    from normablate.sweep import queue

    real = queue.write_meta

    def signalled_write_meta(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(queue, "write_meta", signalled_write_meta)
    extra = {"grid": {"model.norm": ["bn", "none"]}, "n_trials": 2,
             "search_space": {"optim.lr": {"low": 0.01, "high": 1.0, "log": True}}} if kind == "search" else {}
    d = make_spec(tmp_path, kind=kind, **extra)
    url = str(tmp_path / "s.journal")
    res = run_sweep(d, storage=url, workers=1, verbose=False)
    assert res.exit_code == 130 and res.counts.done == 0
    main = optuna.load_study(study_name="t", storage=open_storage(url))
    assert main.user_attrs.get(queue.READY) is True
    monkeypatch.setattr(queue, "write_meta", real)
    again = run_sweep(d, storage=url, workers=1, verbose=False)
    assert again.exit_code == 0 and again.counts.done == again.counts.total == (4 if kind == "search" else 12)
