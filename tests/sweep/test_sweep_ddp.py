"""Sweeps whose trials run Lightning DDP (trainer.devices=2, 2 gloo processes on CPU).

A worker runs such a trial in a child process group (``normablate.sweep.ddp_trial``) instead of letting
Lightning re-run the sweep command on the extra ranks; the trial is recorded like a one-process trial. Checked
here: the recorded metrics equal ``normablate train`` on 2 devices (exactly) and a 1-process run (synchronized BN,
float tolerance); a worker killed mid DDP trial leaves no rank behind and the re-run resumes the trial from its
``last.ckpt`` with every validation recorded once; a pruned DDP trial stops both ranks and is recorded PRUNED;
resource checks refuse what the machine cannot host before any trial runs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from normablate.config import from_dict, load_config, to_dict
from normablate.errors import ConfigError
from normablate.result import RunResult
from normablate.sweep import load_spec, run_sweep
from normablate.sweep.ddp_trial import ENTRY, LAUNCHER_ENV, check_resources, child_env
from normablate.train import train

from support.procs import run_bounded
from support.runs import COMMON, IMAGE
from support.sweep import (ROOT, make_spec, one_complete_per_point, spawn_sweep, sqlite_url, trials_of,
                           trials_so_far, wait_for)

TRAIN = "normablate.train:train"
DDP = {"trainer.devices": 2, "trainer.strategy": "ddp"}


def ddp_spec(tmp_path: Path, grid: dict, **overrides) -> dict:
    """A real-train sweep spec: the tiny ResNet of test_ddp (sync BN, PreciseBN), every trial on 2 CPU ranks."""
    base = {k: v for k, v in to_dict(load_config(None, [*IMAGE, *COMMON])).items() if k not in ("experiment", "run")}
    return make_spec(tmp_path, grid=grid, kind="grid", trainer_fn=TRAIN, base=base, overrides={**DDP, **overrides})


def ddp_ranks() -> set[int]:
    """PIDs of running ``python -m normablate.sweep.ddp_trial`` processes (trial ranks) on this machine."""
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if ENTRY.encode() in cmd and stat[stat.rindex(")") + 2] != "Z":
                pids.add(int(p.name))
    return pids


def describe(pids: set[int], depth: int = 0) -> str:
    """Who the given processes are (state, parent, command line): the message when a rank outlives its trial."""
    out = []
    for pid in sorted(pids):
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
            ppid = int(status.get("PPid", 0))
            parent = describe({ppid}, depth + 1) if ppid > 1 and ppid not in pids and depth < 2 else str(ppid)
            job = next((Path(a) for a in cmd.split() if a.endswith("job.json")), None)
            if job is not None and job.exists():
                j = json.loads(job.read_text())
                cmd += f" [run {j['config'].get('run')}, resume {j['resume']}, trial {(j['pruning'] or {}).get('trial_id')}]"
            out.append(f"pid {pid} state {status.get('State')} LOCAL_RANK {env.get(b'LOCAL_RANK')} parent ({parent}): "
                       f"{cmd[:400]}")
        except OSError:
            out.append(f"pid {pid} (gone)")
    return "; ".join(out)


def no_ranks_left() -> None:
    ranks = ddp_ranks()
    assert not ranks, f"no rank outlives its trial: {describe(ranks)}"


@pytest.mark.slow
def test_ddp_trial_equals_normablate_train_on_two_devices_and_one_process(tmp_path):
    d = ddp_spec(tmp_path, {"seed": [0]})
    d["pruner"] = {"name": "median", "n_startup_trials": 5}  # never prunes here, but rank 0 reports each validation
    res = run_sweep(d)
    assert res.complete and res.exit_code == 0
    (t,) = one_complete_per_point(trials_of(sqlite_url(tmp_path)), 1).values()
    ua = t.user_attrs
    assert ua["status"] == "completed" and ua["steps"] == 4
    assert ua["config"]["trainer"]["devices"] == 2
    assert ua["config"]["trainer"]["threads"] == max(1, (os.cpu_count() or 1) // 2)  # the worker's cores / 2 ranks
    assert set(t.intermediate_values) == {2, 4}
    assert t.value == ua["final"]["val/acc"]
    no_ranks_left()

    # the same trial with `normablate train` on 2 devices: identical numbers
    cfg = dict(ua["config"], run="train-ddp")
    cfg["trainer"] = dict(cfg["trainer"], log_dir=str(tmp_path / "train"))
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_bounded([sys.executable, "-m", "normablate.cli", "train", "--config", str(tmp_path / "trial.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ddp = RunResult.load(tmp_path / "train" / cfg["experiment"] / "train-ddp" / "result.json")
    assert ddp.final == ua["final"]
    assert ddp.best == ua["best"]
    assert ddp.history == ua["history"]

    # and one process on the global batches (synchronized BN): equal to float tolerance (as in test_ddp)
    one = train(from_dict({**cfg, "run": "one", "trainer": {**cfg["trainer"], "devices": 1, "strategy": "auto"}}))
    assert one.steps == 4 and set(one.final) == set(ua["final"])
    loss = abs(one.final["val/loss"])
    for k, v in one.final.items():  # (a gap: the difference of two losses, so its error scales with the loss)
        assert ua["final"][k] == pytest.approx(v, rel=1e-4, abs=max(1e-5, 1e-4 * loss) if "gap" in k else 1e-5), k


@pytest.mark.slow
def test_two_workers_each_running_ddp_trials(tmp_path, monkeypatch):
    """--workers 2 with 2 ranks per trial (allowed on a 4-core machine: pretended here, so 4 processes share 2
    cores): both spawned workers run their DDP trials, every point is done once, each rank gets cores/(2x2)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # (in this process: the check and the workers' thread share)
    res = run_sweep(ddp_spec(tmp_path, {"seed": [0, 1]}, **{"trainer.precise_bn": 0}), workers=2)
    assert res.complete and res.exit_code == 0
    counted = one_complete_per_point(trials_of(sqlite_url(tmp_path)), 2)
    workers = {t.system_attrs["nb:worker"]["pid"] for t in counted.values()}
    assert len(workers) == 2, "both workers ran a trial"
    for t in counted.values():
        assert t.user_attrs["steps"] == 4 and t.user_attrs["config"]["trainer"]["threads"] == 1
    no_ranks_left()


@pytest.mark.slow
def test_sigterm_then_kill_mid_ddp_trials_lose_nothing(tmp_path):
    """One sweep, two interruptions, then a clean finish (one test: each DDP trial start costs two processes'
    imports). 1) SIGTERM to the worker mid trial: passed to rank 0, both ranks checkpoint and stop, the sweep
    exits 130 with the trial re-queued. 2) The re-run resumes it; ``kill -9`` of the worker mid the next trial:
    both ranks die with it (no orphan), no result is written. 3) The last re-run resumes that trial from its
    ``last.ckpt``: every point is done once, with every validation recorded once."""
    steps, every = 45, 3
    d = ddp_spec(tmp_path, {"seed": [0, 1]}, **{"trainer.max_steps": steps, "trainer.val_every": every,
                                                "trainer.precise_bn": 0})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    url = sqlite_url(tmp_path)
    no_ranks_left()

    def mid_trial(point: int):
        def find():
            ts = [t for t in trials_so_far(url) if t.state == TrialState.RUNNING and "run_dir" in t.user_attrs
                  and t.user_attrs.get("point") == point]
            return ts[0] if ts and (Path(ts[0].user_attrs["run_dir"]) / "last.ckpt").exists() else None
        return find

    def interrupt(point: int, sig: int):
        proc = spawn_sweep(path, delay=0)
        try:
            victim = wait_for(mid_trial(point), 600, f"point {point}'s DDP trial with a checkpoint", proc)
            ranks = ddp_ranks()
            assert len(ranks) == 2, f"expected 2 trial ranks, found {ranks}"
            os.kill(proc.pid, sig)  # the worker (workers=1: the sweep process itself)
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wait_for(lambda: not (ranks & ddp_ranks()), 60, "both ranks to exit with their worker")
        assert not (Path(victim.user_attrs["run_dir"]) / "result.json").exists()
        return victim, proc.returncode, out

    # 1) SIGTERM: exit 130, point 0 re-queued with its checkpoint
    first, rc, out = interrupt(0, signal.SIGTERM)
    assert rc == 130, out[-3000:]
    t, queued = [t for t in trials_of(url) if t.user_attrs["point"] == 0]
    assert t.state == TrialState.FAIL and "interrupted" in t.user_attrs["error"]
    assert queued.state == TrialState.WAITING and queued.system_attrs["nb:retry_of"] == [t.number]
    assert (Path(first.user_attrs["run_dir"]) / "last.ckpt").exists()

    # 2) the re-run finishes point 0 (resumed); kill -9 mid point 1
    second, rc, out = interrupt(1, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-3000:]

    # 3) the last re-run resumes point 1 and completes the sweep
    res = run_sweep(str(path))
    assert res.complete and res.exit_code == 0
    trials = trials_of(url)
    counted = one_complete_per_point(trials, 2)
    for victim in (first, second):
        assert next(t for t in trials if t.number == victim.number).state == TrialState.FAIL
        (again,) = [t for t in trials if victim.number in t.system_attrs.get("nb:retry_of", [])]
        assert again.state == TrialState.COMPLETE and again.user_attrs["resumed"] is True
        assert again.user_attrs["run_dir"] == victim.user_attrs["run_dir"]
    for t in counted.values():
        ua = t.user_attrs
        assert ua["status"] == "completed" and ua["steps"] == steps
        assert [s for s, _ in ua["history"]["val/acc"]] == list(range(every, steps + 1, every)), "every validation once"
    no_ranks_left()


def test_ddp_trial_error_is_recorded_with_the_trials_traceback(tmp_path):
    """A DDP trial that fails in its process (here: a BatchNorm that cannot synchronize) is FAILED with the child's
    error and traceback, like a one-process trial; the sweep exits 1."""
    d = ddp_spec(tmp_path, {"seed": [0]}, **{"model.norm": "torch.nn:BatchNorm2d", "trainer.sync_batchnorm": True})
    res = run_sweep(d)
    assert res.exit_code == 1 and res.counts.failed == 1
    (t,) = trials_of(sqlite_url(tmp_path))
    assert t.state == TrialState.FAIL
    assert t.user_attrs["error"].startswith("normablate.errors.ConfigError: trainer.sync_batchnorm: layer")
    assert "normablate/sweep/ddp_trial.py" in t.user_attrs["traceback"] and "sync.enable" in t.user_attrs["traceback"]
    no_ranks_left()


@pytest.mark.slow
def test_pruned_ddp_trial_stops_both_ranks_and_is_recorded_pruned(tmp_path, capfd):
    """A threshold no accuracy reaches prunes the trial at its first validation: rank 0 reports to Optuna, both
    ranks stop there (each says so), the trial is PRUNED with that report, and the sweep goes on."""
    d = ddp_spec(tmp_path, {"seed": [0]}, **{"trainer.max_steps": 40, "trainer.val_every": 2,
                                              "trainer.precise_bn": 0})
    d["pruner"] = {"name": "threshold", "lower": 1.01}  # val/acc < 1.01 always: pruned at step 2
    res = run_sweep(d)
    assert res.complete and res.exit_code == 0
    (t,) = trials_of(sqlite_url(tmp_path))
    assert t.state == TrialState.PRUNED
    assert list(t.intermediate_values) == [2] and 0 <= t.intermediate_values[2] <= 1
    assert t.value == t.intermediate_values[2]
    ua = t.user_attrs
    assert ua["status"] == "pruned" and ua["steps"] == 2
    assert [s for s, _ in ua["history"]["val/acc"]] == [2]
    err = capfd.readouterr().err
    assert "rank 0: trial pruned at step 2" in err and "rank 1: trial pruned at step 2" in err, err[-3000:]
    no_ranks_left()


def test_resources_refused_before_any_trial(tmp_path):
    spec = load_spec(ddp_spec(tmp_path, {"seed": [0]}))
    check_resources(spec, workers=1, n_cores=2)
    with pytest.raises(ConfigError, match=r"trainer.devices=2 x --workers 2 = 4 CPU processes, but this machine "
                                          r"has 2 cores; allowed: trainer.devices x --workers <= 2"):
        check_resources(spec, workers=2, n_cores=2)
    n = os.cpu_count() or 1
    with pytest.raises(ConfigError, match=f"trainer.devices=2 x --workers {n} = {2 * n} CPU processes"):
        run_sweep(spec, workers=n)
    assert not (tmp_path / "logs" / "optuna.db").exists(), "refused before the study was created"

    gpu = load_spec(ddp_spec(tmp_path, {"seed": [0]}, **{"trainer.accelerator": "gpu"}))  # --check: fine here
    assert gpu.validate_all() == 1
    import torch

    if torch.cuda.device_count() < 2:
        with pytest.raises(ConfigError, match=r"grid point \[seed=0\]: trainer.accelerator='gpu' but this machine has no "
                                              r"usable CUDA GPU|trainer.devices=2 but this machine has \d CUDA GPU"):
            run_sweep(gpu)

    nodes = load_spec(ddp_spec(tmp_path, {"seed": [0]}, **{"trainer.num_nodes": 2, "data.batch_size": 32}))
    with pytest.raises(ConfigError, match="trainer.num_nodes=2 is not allowed in a sweep; valid: 1"):
        check_resources(nodes, workers=1, n_cores=64)
    dry = load_spec(ddp_spec(tmp_path, {"seed": [0]}, **{"trainer.devices": 8, "data.batch_size": 64}),
                    dry_run=True)
    check_resources(dry, workers=4, n_cores=2)  # the dry-run trainer trains nothing: nothing to refuse


def test_child_environment_drops_launcher_variables(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "MASTER_PORT", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(k, "3")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    env = child_env()
    assert not set(LAUNCHER_ENV) & set(env)
    assert env["SLURM_JOB_ID"] == "7"
