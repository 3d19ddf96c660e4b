"""Sweeps across machines as users run them: scripts/start_postgres.sh starts the server and prints the URL;
workers in separate sessions (process groups, as on separate machines) share the study; every point counted once.
The Slurm script is checked for syntax and for running exactly that worker command."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from support import pg
from support.sweep import make_spec, one_complete_per_point, spawn_sweep, trials_of
from support.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_start_postgres_script_and_three_workers_in_separate_sessions(tmp_path):
    reason = pg.unavailable_reason()
    if reason:
        pytest.skip(reason)
    data = Path(tempfile.mkdtemp(prefix="nb-pgscript-"))  # pytest's tmp dirs are private to root, not postgres
    os.chmod(data, 0o755)
    env = {**os.environ, "NORMABLATE_PG_BIN": str(pg.pg_bin())}
    port = free_port()
    try:
        out = subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), str(data / "db"), str(port)],
                             capture_output=True, text=True, timeout=180, env=env)
        assert out.returncode == 0, out.stderr
        url = out.stdout.strip().splitlines()[-1]
        password = (data / "db.password").read_text().strip()  # generated, 0600 (scram-sha-256 authentication)
        assert url == f"postgresql://postgres:{password}@127.0.0.1:{port}/optuna"
        again = subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), str(data / "db"), str(port)],
                               capture_output=True, text=True, timeout=180, env=env)
        assert again.returncode == 0 and again.stdout.strip() == url, again.stderr  # idempotent
        d = make_spec(tmp_path, grid={"model.norm": ["bn", "ln", "none"], "optim.lr": [0.01, 0.1, 0.3], "seed": [0]})
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump(d))
        workers = [spawn_sweep(spec, "--storage", url, delay=0.3) for _ in range(3)]  # start_new_session=True
        try:
            outs = [w.communicate(timeout=600)[0] for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    os.killpg(w.pid, 9)
                    w.wait()
        assert all(w.returncode == 0 for w in workers), "\n=====\n".join(o[:3000] for o in outs)
        trials = trials_of(url)
        one_complete_per_point(trials, 9)
        assert len(trials) == 9, "no point ran twice"
    finally:
        ctl = [str(pg.pg_bin() / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"]
        if os.geteuid() == 0:
            ctl = ["runuser", "-u", "postgres", "--", *ctl]
        subprocess.run(ctl, capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", str(data)], timeout=60)


def test_slurm_script_runs_one_sweep_worker_per_task(tmp_path):
    script = ROOT / "scripts" / "slurm_sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "normablate").write_text('#!/usr/bin/env bash\necho "ARGS $*"\n')
    (fake / "normablate").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "NB_STORAGE": "postgresql://u@h/db",
           "NB_SPEC": "configs/sweeps/quick.yaml", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "3"}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("ARGS sweep --config configs/sweeps/quick.yaml --storage postgresql://u@h/db "
                                "--no-report trainer.accelerator=auto trainer.threads=3")
    env.pop("NB_STORAGE")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "NB_STORAGE" in r.stderr
