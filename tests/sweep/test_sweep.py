"""Sweep mechanics: spec checking, the work queue, resume after SIGKILL, dead workers, storages, workers.

Most tests use the dry-run trainer (``normablate.sweep.dryrun:train``: instant, deterministic, fake curves)
because the point is the bookkeeping; ``test_real_train_end_to_end`` runs the real ``train``.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from normablate.errors import ConfigError
from normablate.sweep import load_spec, run_sweep
from normablate.sweep.runner import HOST, Sweep

from support import pg
from support.sweep import (ATTRS, make_spec, one_complete_per_point, spawn_sweep, sqlite_url, trials_of,
                           trials_so_far, wait_for, worker_pid)

# ------------------------------------------------------------------------------------------ spec checks
@pytest.mark.parametrize("change, message", [
    ({"grdi": {}}, "did you mean 'grid'"),
    ({"kind": "lr_sensitivty"}, "did you mean 'lr_sensitivity'"),
    ({"grid": {"optim.lrr": [0.1], "optim.lr": [0.1]}}, "optim.lrr"),
    ({"grid": {"model.norm": ["bn", "bnn"], "optim.lr": [0.1]}}, "bnn"),
    ({"grid": {"model.norm": ["bn"]}}, "needs a grid axis 'optim.lr'"),
    ({"grid": {"optim.lr": [0.1, 0.1]}}, "twice"),
    ({"lr_scaling": "linear"}, "belongs to kind 'batch_size'"),
    ({"metric": "val/ppl"}, "not allowed for task"),
    ({"pruner": "medain"}, "did you mean 'median'"),
    ({"kind": "search", "grid": {}, "n_trials": 2, "search_space": {"optim.lr": {"low": 1, "hgh": 2}}}, "hgh"),
    ({"kind": "search", "grid": {}, "n_trials": 2, "search_space": {"optim.momentum": {"low": 0.5, "high": 1.5}}},
     "momentum"),
    ({"kind": "convergence", "grid": {"model.norm": ["bn"]}}, "target"),
])
def test_bad_specs_fail_before_any_trial(tmp_path, change, message):
    d = make_spec(tmp_path)
    d.update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_sweep(d)
    assert not (tmp_path / "logs").exists(), "nothing may be created before the spec is valid"


def test_spec_expansion_and_kind_rules(tmp_path):
    spec = load_spec(make_spec(tmp_path, grid={"model.norm": ["bn", {"name": "bn", "momentum": 0.01}],
                                               "optim.lr": {"logspace": [0.001, 1.0, 4]}, "seed": [0, 1]}))
    assert spec.total == 16 and [a.name for a in spec.axes] == ["norm", "lr", "seed"]
    assert spec.axes[1].values == [0.001, 0.01, 0.1, 1.0]
    p = spec.points()[-1]
    assert p.label(spec.axes) == "norm=bn(momentum=0.01) lr=1 seed=1"
    d = spec.trial_dict(p, run="r")
    assert d["model"]["norm"] == {"name": "bn", "momentum": 0.01} and d["experiment"] == "t"
    assert d["trainer"]["log_dir"] == str(tmp_path / "logs") and d["trainer"]["progress"] is False

    bs = load_spec(make_spec(tmp_path, kind="batch_size", grid={"data.batch_size": [16, 32, 128]},
                             lr_scaling="linear", base_batch_size=32, budget={"samples": 1280}))
    cfgs = [bs.trial_dict(p) for p in bs.points()]
    assert [c["optim"]["lr"] for c in cfgs] == pytest.approx([0.05, 0.1, 0.4])
    assert [c["trainer"]["max_steps"] for c in cfgs] == [80, 40, 10]
    assert [c["trainer"]["val_every"] for c in cfgs] == [20, 10, 2]  # same samples between validations

    cv = load_spec(make_spec(tmp_path, kind="convergence", grid={"model.norm": ["bn"]},
                             target={"metric": "val/acc", "value": 0.5}))
    t = cv.trial_dict(cv.points()[0])["trainer"]
    assert (t["target_metric"], t["target_value"]) == ("val/acc", 0.5)


def test_rerun_continues_and_refuses_a_changed_spec(tmp_path):
    d = make_spec(tmp_path)
    res = run_sweep(d)
    assert res.complete and res.counts.total == 12 and res.exit_code == 0
    url = sqlite_url(tmp_path)
    first = {t.number: t.datetime_start for t in trials_of(url)}
    res2 = run_sweep(d)  # nothing left to do: no trial repeated
    assert res2.complete
    assert {t.number: t.datetime_start for t in trials_of(url)} == first
    changed = make_spec(tmp_path, overrides={"trainer.max_steps": 30})
    with pytest.raises(ConfigError, match="different sweep spec.*overrides.trainer.max_steps"):
        run_sweep(changed)


def test_more_seeds_extend_a_finished_study_without_repeating_it(tmp_path):
    grid = {"seed": [0, 1], "model.norm": ["bn", "none"], "optim.lr": [0.03, 0.1]}
    assert run_sweep(make_spec(tmp_path, grid=grid)).counts.total == 8
    url = sqlite_url(tmp_path)
    first = {t.number: (t.datetime_start, t.user_attrs["point"]) for t in trials_of(url)}
    more = run_sweep(make_spec(tmp_path, grid={**grid, "seed": [0, 1, 2]}, description="now 3 seeds"))
    assert more.complete and more.counts.total == 12 and more.counts.done == 12
    trials = trials_of(url)
    assert {t.number: (t.datetime_start, t.user_attrs["point"]) for t in trials if t.number in first} == first
    new = [t for t in trials if t.number not in first]
    assert sorted(t.user_attrs["point"] for t in new) == [8, 9, 10, 11]
    assert {t.user_attrs["config"]["seed"] for t in new} == {2}
    # only seeds may grow, only at the end of the outermost axis
    for changed in ({**grid, "seed": [1, 2, 3]}, {**grid, "optim.lr": [0.03, 0.1, 0.3]},
                    {"model.norm": ["bn", "none"], "seed": [0, 1, 2, 3], "optim.lr": [0.03, 0.1]}):
        with pytest.raises(ConfigError, match="different sweep spec"):
            run_sweep(make_spec(tmp_path, grid=changed))


def test_trial_records_and_run_dirs(tmp_path):
    run_sweep(make_spec(tmp_path))
    trials = trials_of(sqlite_url(tmp_path))
    by_point = one_complete_per_point(trials, 12)
    for t in by_point.values():
        missing = [a for a in ATTRS if a not in t.user_attrs]
        assert not missing, missing
        json.dumps(t.user_attrs)  # JSON-serialisable
        ua = t.user_attrs
        assert ua["config"]["experiment"] == "t" and ua["run"].startswith(f"t{t.number:04d}-")
        assert Path(ua["run_dir"]) == tmp_path / "logs" / "t" / ua["run"]
        assert (Path(ua["run_dir"]) / "result.json").exists()
        assert t.params["optim.lr"] == ua["config"]["optim"]["lr"]
        assert "train/loss" in ua["history"]
        if ua["config"]["model"]["norm"] == "none" and ua["config"]["optim"]["lr"] == 1.0:
            assert ua["diverged"] and ua["status"] == "diverged" and ua["diverged_step"] is not None
            assert t.value == float("-inf")  # worst for a maximized metric; COMPLETE, not FAIL
        else:
            assert not ua["diverged"] and t.value == pytest.approx(ua["final"]["val/acc"])


def test_dead_worker_trial_is_failed_retried_and_resumed(tmp_path):
    """A RUNNING trial whose worker went silent (another machine) is failed and re-run from its checkpoint."""
    d = make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1, 0.3]})
    spec = load_spec(d)
    sw = Sweep(spec, verbose=False)
    sw.setup()
    slot = sw.claim()  # pretend a worker elsewhere took it, wrote a checkpoint at step 10, then vanished
    tid = slot.trial._trial_id
    sw.my_trials.clear()
    run = "t0000-bn-lr0.1"
    slot.trial.set_user_attr("run", run)
    sw.storage.set_trial_system_attr(tid, "nb:worker", {"host": "elsewhere", "pid": 1})
    sw.storage.set_trial_system_attr(tid, "nb:heartbeat", time.time() - 60)
    run_dir = tmp_path / "logs" / "t" / run
    run_dir.mkdir(parents=True)
    (run_dir / "last.ckpt").write_text(json.dumps({"step": 10, "history": {"train/loss": [[10, 2.0]]}}))
    assert sw.work(poll=0.1) == 0
    trials = trials_of(sqlite_url(tmp_path))
    dead = next(t for t in trials if t._trial_id == tid)
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("nb:retry_of") == [dead.number])
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["run"] == run and retry.user_attrs["resumed"]
    assert retry.user_attrs["history"]["train/loss"][0] == [10, 2.0]  # continued, not restarted
    one_complete_per_point(trials, 2)


def worker_died(sw, slot) -> None:
    """Mark ``slot``'s trial as claimed by a worker on this host that is dead at once (a pid above Linux's
    largest), so the next ``reap_stale`` fails it."""
    sw.storage.set_trial_system_attr(slot.trial._trial_id, "nb:worker", {"host": HOST, "pid": 2 ** 22 + 1})


def test_a_trial_whose_worker_keeps_dying_is_retried_max_retry_times_per_command(tmp_path, capsys, monkeypatch):
    """heartbeat.max_retry bounds the retries of one point per command: the retry of a dead worker's trial is queued
    again while under it, then not (and the log says so, not "queued again"); running the command again gives the
    point a retry in its own folder and a fresh allowance, counted from that re-run and bounded again. A stop by a
    signal is no failure of the point: the stopped trial is re-queued even once the allowance is used, and its
    retry starts a fresh one (the command that resumes it is a new command), so repeated stops never use up the
    retries of the commands after them. Any other interruption (a SystemExit with no stop requested) counts like
    a death: past the allowance it is not re-queued, and its error says so."""
    from normablate.signals import STOP
    from normablate.sweep.queue import INTERRUPTED

    spec = load_spec(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]},
                               heartbeat={"interval": 1, "grace": 6, "max_retry": 1}))

    def claimed(sw):  # a worker on this host claims the waiting trial (a retry keeps its folder)
        slot = sw.claim()
        sw.my_trials.clear()
        assert sw.storage.get_trial(slot.trial._trial_id).system_attrs.get("nb:run") in (None, "bn-lr0.1")
        slot.trial.set_user_attr("run", "bn-lr0.1")  # (as run_slot does)
        return slot

    def dies(sw):  # ... and is killed
        slot = claimed(sw)
        worker_died(sw, slot)
        assert sw.reap_stale() == 1
        return slot.trial.number

    def waiting():
        return [(t.system_attrs["nb:retry_of"], t.system_attrs["nb:rerun_at"], t.system_attrs["nb:run"])
                for t in trials_of(sqlite_url(tmp_path)) if t.state == TrialState.WAITING]

    sw = Sweep(spec, verbose=True)
    sw.setup()
    first = dies(sw)
    assert "failed: its worker process is gone; queued again" in capsys.readouterr().out
    second = dies(sw)  # the retry (attempt 2), in the same folder
    out = capsys.readouterr().out
    assert "not retried again (2 attempts)" in out and "queued again" not in out
    assert waiting() == []

    again = Sweep(spec, verbose=True)  # the command, run again
    again.setup()
    assert waiting() == [([first, second], 2, "bn-lr0.1")]
    third = dies(again)  # a fresh allowance: attempt 3 is this command's first
    assert waiting() == [([first, second, third], 2, "bn-lr0.1")]
    capsys.readouterr()
    fourth = dies(again)  # attempt 4: the allowance of this command is used too
    assert "not retried again (4 attempts)" in capsys.readouterr().out and waiting() == []

    last = Sweep(spec, verbose=True)  # a third command: attempt 5 is reaped and retried; attempt 6 ends in a
    last.setup()  # SystemExit that is no stop (a trainer's sys.exit): counted like a death, so not re-queued
    fifth = dies(last)
    slot = claimed(last)
    last._interrupt(slot, "interrupted (SystemExit)")
    assert "not retried again (6 attempts)" in capsys.readouterr().out and waiting() == []
    assert last.storage.get_trial(slot.trial._trial_id).user_attrs["error"] == \
        "interrupted (SystemExit); not retried again (6 attempts); re-run the command to retry"
    sixth = slot.trial.number

    fourth_cmd = Sweep(spec, verbose=True)  # attempt 7 dies (retried), attempt 8 is stopped by a signal: re-queued
    fourth_cmd.setup()  # although the allowance is used, with a fresh one (the command resuming it is a new one)
    seventh = dies(fourth_cmd)
    slot = claimed(fourth_cmd)
    monkeypatch.setattr(STOP, "signum", signal.SIGTERM)
    fourth_cmd._interrupt(slot, INTERRUPTED)
    monkeypatch.setattr(STOP, "signum", None)
    assert "not retried" not in capsys.readouterr().out
    stopped = fourth_cmd.storage.get_trial(slot.trial._trial_id)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["error"] == INTERRUPTED
    chain = [first, second, third, fourth, fifth, sixth, seventh, slot.trial.number]
    assert waiting() == [(chain, 8, "bn-lr0.1")]
    resumed = Sweep(spec, verbose=True)  # the next command: its worker dies once, which its allowance covers
    resumed.setup()
    dies(resumed)
    assert "failed: its worker process is gone; queued again" in capsys.readouterr().out
    assert len(waiting()) == 1


def test_a_stopped_trial_that_another_worker_reaped_first_is_not_queued_twice(tmp_path, capsys):
    """A worker silent for longer than the grace (suspended, say) has its trial failed and retried by another
    worker's reaper; when it is then stopped by a signal, it must not queue a second retry of the same run folder
    (two workers would resume one checkpoint). Two things guard it: the trial's error cannot be set once it is
    finished, and ``_tell`` says when another worker failed it first (for the moment between the two)."""
    from normablate.sweep.queue import INTERRUPTED

    sw = Sweep(load_spec(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]})), verbose=True)
    sw.setup()
    slot = sw.claim()
    slot.trial.set_user_attr("run", "bn-lr0.1")
    other = Sweep(sw.spec, verbose=False)  # another worker's reaper finds it silent
    other.setup()
    worker_died(other, slot)
    assert other.reap_stale() == 1
    capsys.readouterr()
    sw._interrupt(slot, INTERRUPTED)  # the silent worker wakes up to its stop signal
    out = capsys.readouterr().out  # it says so, and not that a retry is missing
    assert "was failed by another worker meanwhile" in out and "could not be queued" not in out
    retries = [t for t in trials_of(sqlite_url(tmp_path)) if t.state == TrialState.WAITING]
    assert [(t.system_attrs["nb:retry_of"], t.system_attrs["nb:run"]) for t in retries] == [([0], "bn-lr0.1")]


def test_a_reaped_trial_is_logged_even_when_its_retry_cannot_be_queued(tmp_path, capsys, monkeypatch):
    """The storage fails while the reaper queues a dead worker's retry: the failure still reaches the log (which
    trial, why it failed, that no retry is queued and how to get one) before the error propagates, and the trial
    stays FAIL, so running the command again retries it."""
    import optuna

    sw = Sweep(load_spec(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]})), verbose=True)
    sw.setup()
    slot = sw.claim()
    sw.my_trials.clear()
    slot.trial.set_user_attr("run", "bn-lr0.1")
    worker_died(sw, slot)

    def down(self, trial):
        raise RuntimeError("storage down")

    monkeypatch.setattr(optuna.Study, "add_trial", down)
    with pytest.raises(RuntimeError, match="storage down"):
        sw.reap_stale()
    assert ("trial 0 (bn-lr0.1) failed: its worker process is gone; its retry could not be queued (storage "
            "error); re-run the command to retry it") in capsys.readouterr().out
    monkeypatch.undo()
    assert [t.state for t in trials_of(sqlite_url(tmp_path))] == [TrialState.FAIL]
    again = Sweep(sw.spec, verbose=False)
    again.setup()
    assert [t.state for t in trials_of(sqlite_url(tmp_path))] == [TrialState.FAIL, TrialState.WAITING]


@pytest.mark.parametrize("when", ["report", "pruned", "before_tell"])
def test_a_live_worker_whose_trial_was_reaped_drops_its_result_and_goes_on(tmp_path, capsys, monkeypatch, when):
    """A worker silent for longer than the grace (a suspended machine) has its trial failed and retried by another
    worker's reaper, then wakes up: its next storage write for the trial is refused (the pruning callback's report
    at the next validation, the pruned record, or the final tell: Optuna's "Cannot tell a FAIL trial."). That is
    no crash of the run and no reason for the worker to die: it says what happened, drops its result, records no
    error, and the point's one retry stays queued."""
    import optuna

    from normablate.sweep.dryrun import train

    sw = Sweep(load_spec(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]})), verbose=True)
    sw.setup()
    slot = sw.claim()

    def reap():  # another worker's reaper, seeing no heartbeat
        other = Sweep(sw.spec, verbose=False)
        other.setup()
        worker_died(other, slot)
        assert other.reap_stale() == 1

    def trainer(cfg, callbacks=None, resume=False):
        if when == "before_tell":
            return train(cfg, callbacks=callbacks, resume=resume)
        reap()
        if when == "pruned":
            raise optuna.TrialPruned("pruned at step 10")
        next(c for c in callbacks if hasattr(c, "trial")).trial.report(0.5, 10)  # as OptunaPruning does
        raise AssertionError("the report was accepted")

    if when == "before_tell":
        record = sw._record
        monkeypatch.setattr(sw, "_record", lambda trial, r: (record(trial, r), reap())[0])
    summary = sw.run_slot(slot, trainer)
    assert "dropped (failed by another worker meanwhile)" in summary or when == "before_tell"
    assert (f"trial {slot.trial.number} was failed by another worker meanwhile (no heartbeat seen for "
            f"heartbeat.grace); this worker's result for it is dropped; its retry resumes from the run's "
            f"checkpoint") in capsys.readouterr().out
    trials = trials_of(sqlite_url(tmp_path))
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert "error" not in trials[0].user_attrs and trials[1].system_attrs["nb:retry_of"] == [slot.trial.number]
    assert slot.trial._trial_id not in sw.my_trials


def test_two_retries_of_one_attempt_queued_by_concurrent_reruns_run_once(tmp_path, capsys):
    """Two commands started at once (a re-submitted Slurm array) can both find a failed trial unretried and both
    queue its retry. Only the lower-numbered retry runs; the other is skipped as a duplicate when claimed, before
    it touches the run folder, so two workers never resume one checkpoint; the skipped one is not retried."""
    from normablate.sweep.dryrun import train
    from normablate.sweep.queue import INTERRUPTED, retry_of

    sw = Sweep(load_spec(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]})), verbose=True)
    sw.setup()
    slot = sw.claim()
    slot.trial.set_user_attr("run", "t0000-bn-lr0.1")
    slot.trial.set_user_attr("error", INTERRUPTED)
    slot.study.tell(slot.trial, state=TrialState.FAIL)
    failed = sw.storage.get_trial(slot.trial._trial_id)
    for _ in range(2):  # both commands' start-up re-queue, racing
        slot.study.add_trial(retry_of(failed, "failed; the command was run again", rerun=True))
    first, second = sw.claim(), sw.claim()  # two workers claim one each
    assert sw.run_slot(second, train) == \
        f"trial {second.trial.number} skipped (a duplicate of trial {first.trial.number}: same point, or same retry)"
    assert "val/acc" in sw.run_slot(first, train)  # (it ran)
    trials = trials_of(sqlite_url(tmp_path))
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["run"] == "t0000-bn-lr0.1" and "run" not in trials[2].user_attrs
    again = Sweep(sw.spec, verbose=False)  # a later re-run finds the point done: nothing to queue
    again.setup()
    assert len(trials_of(sqlite_url(tmp_path))) == 3 and again.counts().done == 1


def test_a_retry_that_failed_before_recording_its_run_keeps_its_folder():
    """A retry reaped between its claim and the moment its worker records ``run`` has its folder only in
    ``nb:run``: its own retry (and a re-run's) must resume in that folder, not start a new one from step 0."""
    import optuna

    from normablate.sweep.queue import _failed_unretried, retry_of

    t = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"point": 0},
                                  system_attrs={"nb:retry_of": [0], "nb:run": "t0000-bn-lr0.1", "fixed_params": {}})
    t.number = 1
    assert retry_of(t, "its worker process is gone", rerun=False).system_attrs["nb:run"] == "t0000-bn-lr0.1"
    assert _failed_unretried([t]) == [t]


def test_reaper_ignores_clock_skew_of_live_workers(tmp_path, monkeypatch):
    """A worker on a machine whose clock is an hour behind keeps beating: it is alive, never reaped.
    Once its heartbeat value stops changing for `grace` seconds of *our* clock, it is."""
    import types

    from normablate.sweep import reaper

    clock = [1_000_000.0]
    monkeypatch.setattr(reaper, "time", types.SimpleNamespace(**{**vars(time), "time": lambda: clock[0]}))
    spec = load_spec(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]}))
    sw = Sweep(spec, verbose=False)
    sw.setup()
    tid = sw.claim().trial._trial_id
    sw.my_trials.clear()
    sw.storage.set_trial_system_attr(tid, "nb:worker", {"host": "elsewhere", "pid": 1})
    grace = float(spec.heartbeat["grace"])
    for beat in range(5):  # skewed by an hour, but changing: alive
        sw.storage.set_trial_system_attr(tid, "nb:heartbeat", clock[0] - 3600 + beat)
        assert sw.reap_stale() == 0
        clock[0] += grace * 0.9
    clock[0] += grace + 1  # no new beat for longer than grace (local time): dead
    assert sw.reap_stale() == 1
    assert sw.storage.get_trial(tid).state == TrialState.FAIL


def test_search_kind_one_study_per_group(tmp_path):
    d = make_spec(tmp_path, kind="search", grid={"model.norm": ["bn", "ln"]}, n_trials=5,
                  search_space={"optim.lr": {"low": 0.001, "high": 1.0, "log": True},
                                "data.batch_size": {"choices": [16, 32]}},
                  sampler={"name": "tpe", "seed": 1, "n_startup_trials": 3})
    res = run_sweep(d)
    assert res.complete and res.counts.done == 10
    assert res.studies == ["t/norm=bn", "t/norm=ln"]
    url = sqlite_url(tmp_path)
    for name, norm in zip(res.studies, ["bn", "ln"]):
        ts = trials_of(url, name)
        assert len(ts) == 5 and all(t.state == TrialState.COMPLETE for t in ts)
        assert all(t.user_attrs["config"]["model"]["norm"] == norm for t in ts)
        assert all(0.001 <= t.params["optim.lr"] <= 1.0 and t.params["data.batch_size"] in (16, 32) for t in ts)


def test_pruning_with_median_pruner(tmp_path):
    d = make_spec(tmp_path, kind="grid", grid={"optim.lr": [0.3, 0.25, 0.2, 0.001, 0.0005]},
                  pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 0},
                  overrides={"trainer.max_steps": 40, "trainer.val_every": 5})
    res = run_sweep(d)
    assert res.complete
    trials = trials_of(sqlite_url(tmp_path))
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the tiny LRs should be pruned against the median of the first three"
    assert all(t.user_attrs["status"] == "pruned" and t.intermediate_values for t in pruned)


def test_cli_check_and_dry_run(tmp_path, capsys):
    from normablate.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**make_spec(tmp_path), "trainer_fn": "normablate.train:train"}))
    assert main(["sweep", "--config", str(path), "--check"]) == 0
    assert "12 trials" in capsys.readouterr().out
    assert main(["sweep", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12/12 trials done" in out and "ETA" in out and "report:" in out
    assert (tmp_path / "logs" / "t-dryrun" / "report" / "summary.md").exists()


# ------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_resume_after_sigkill_of_the_sweep(tmp_path):
    """Kill the whole sweep (parent and its 2 workers) with SIGKILL mid-trial; the re-run loses nothing."""
    d = make_spec(tmp_path, grid={"model.norm": ["bn", "ln"], "optim.lr": [0.01, 0.1, 0.3], "seed": [0]})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    url = sqlite_url(tmp_path)
    proc = spawn_sweep(path, "--workers", "2", delay=2.0)
    try:
        def ready():
            ts = trials_so_far(url)
            done = [t for t in ts if t.state == TrialState.COMPLETE]
            running = [t for t in ts if t.state == TrialState.RUNNING and "run" in t.user_attrs]
            return (done, running) if len(done) >= 2 and running else None

        wait_for(ready, 120, "two trials COMPLETE and one RUNNING", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill = trials_of(url)  # what the storage holds once every process is dead
    before = {t.number: t.datetime_start for t in at_kill if t.state == TrialState.COMPLETE}
    running = [t for t in at_kill if t.state == TrialState.RUNNING]
    assert running, "the kill should have caught at least one trial mid-run"
    res = run_sweep(path)  # in this process, no delay
    assert res.complete and res.exit_code == 0
    trials = trials_of(url)
    counted = one_complete_per_point(trials, 6)
    after = {t.number: t.datetime_start for t in trials if t.number in before}
    assert after == before, "trials finished before the kill must not be re-run"
    assert set(before) <= {t.number for t in counted.values()}
    killed = [t for t in trials if t.number in {r.number for r in running}]
    assert killed and all(t.state == TrialState.FAIL for t in killed)
    assert any("run" in t.user_attrs for t in killed)  # ready() waited for one that had started its run
    for t in killed:
        retry = [r for r in trials if t.number in r.system_attrs.get("nb:retry_of", [])]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        # Same run dir: continues from last.ckpt. (A trial killed between its claim and naming its run has
        # no run dir yet; its retry names one afresh.)
        if "run" in t.user_attrs:
            assert retry[0].user_attrs["run"] == t.user_attrs["run"]
        else:
            assert retry[0].user_attrs["run"]


@pytest.mark.slow
def test_postgres_two_workers_one_killed(tmp_path):
    reason = pg.unavailable_reason()
    if reason:
        pytest.skip(reason)
    d = make_spec(tmp_path, grid={"model.norm": ["bn", "ln"], "optim.lr": [0.01, 0.03, 0.1, 0.3], "seed": [0]})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    with pg.PostgresServer() as url:
        a = spawn_sweep(path, "--storage", url, delay=1.5)  # two "machines" sharing one study
        b = spawn_sweep(path, "--storage", url, delay=1.5)
        try:
            def b_mid_trial():
                ts = trials_so_far(url)
                pid = {worker_pid(t): t for t in ts}
                b_running = [t for t in ts if t.state == TrialState.RUNNING and "run" in t.user_attrs
                             and worker_pid(t) == b.pid]
                b_done = [t for t in ts if t.state == TrialState.COMPLETE
                          and worker_pid(t) == b.pid]
                return b_running if a.pid in pid and b_done and b_running else None

            wait_for(b_mid_trial, 120, "both workers busy, B mid-trial after finishing one", b)
            os.killpg(b.pid, signal.SIGKILL)
            b.wait()
            out, _ = a.communicate(timeout=180)
        finally:
            for p in (a, b):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        assert a.returncode == 0, out
        trials = trials_of(url)
        counted = one_complete_per_point(trials, 8)
        workers = Counter((t.system_attrs["nb:worker"]["host"], t.system_attrs["nb:worker"]["pid"])
                          for t in counted.values())
        assert set(workers) == {(HOST, a.pid), (HOST, b.pid)}, workers  # both shared the work
        victims = [t for t in trials if t.state != TrialState.COMPLETE  # B's trial in flight when it died
                   and worker_pid(t) == b.pid]
        assert len(victims) == 1, "B was killed mid-trial"
        dead = next(t for t in trials if t.number == victims[0].number)
        assert dead.state == TrialState.FAIL
        retry = [t for t in trials if dead.number in t.system_attrs.get("nb:retry_of", [])]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        assert retry[0].system_attrs["nb:worker"]["pid"] == a.pid
        assert "worker process is gone" in out


@pytest.mark.slow
def test_journal_storage_with_two_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMABLATE_DRYRUN_DELAY", "0.5")
    d = make_spec(tmp_path, grid={"model.norm": ["bn", "ln"], "optim.lr": [0.01, 0.03, 0.1, 0.3], "seed": [0]})
    journal = tmp_path / "sweep.journal"
    res = run_sweep(d, storage=str(journal), workers=2)
    assert res.storage == f"journal:{journal}" and res.complete and res.exit_code == 0
    trials = trials_of(res.storage)
    counted = one_complete_per_point(trials, 8)
    assert len(trials) == 8
    assert all(t.user_attrs["config"]["trainer"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
               for t in counted.values())


@pytest.mark.slow
def test_real_train_end_to_end(tmp_path, capsys):
    """The real trainer: a tiny VGG on the embedded data, 2 norms, with Optuna pruning reports."""
    d = make_spec(tmp_path, kind="grid", grid={"model.norm": ["bn", "none"]},
                  trainer_fn="normablate.train:train", pruner={"name": "median", "n_startup_trials": 5},
                  overrides={"trainer.max_steps": 20, "trainer.val_every": 10, "trainer.threads": 1})
    res = run_sweep(d)
    assert res.complete and res.exit_code == 0, capsys.readouterr().out
    trials = trials_of(sqlite_url(tmp_path))
    counted = one_complete_per_point(trials, 2)
    for t in counted.values():
        ua = t.user_attrs
        assert ua["status"] == "completed" and ua["steps"] == 20
        assert set(t.intermediate_values) == {10, 20}  # the pruning callback reported each validation
        assert t.value == pytest.approx(ua["final"]["val/acc"])
        run_dir = Path(ua["run_dir"])
        assert run_dir.parent == tmp_path / "logs" / "t"
        assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard logs live under <log_dir>/<study>/"
        assert (run_dir / "result.json").exists()
        assert 0 < ua["cpu_time"] and ua["versions"]["cpu"] and ua["versions"]["torch"]  # what the run cost, where
        assert ua["num_classes"] == 10  # the embedded data's classes: the report's "at chance" rule reads them
    assert "val/loss_batchstats" in counted[0].user_attrs["final"]  # BN
    from normablate.report import write_report

    out = write_report("t", storage=res.storage)
    assert (out / "summary.csv").exists() and (out / "loss_curves.png").exists()
    cpu_h = sum(t.user_attrs["cpu_time"] for t in counted.values()) / 3600
    assert "- cost: 2 runs, " in (text := (out / "summary.md").read_text()) and f"{cpu_h:.2f} CPU-hours summed" in text
