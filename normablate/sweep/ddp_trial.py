"""Sweep trials that run Lightning DDP (``trainer.devices > 1``): one child process group per trial.

Lightning's DDP launcher starts the extra ranks by re-running ``sys.argv``. Inside a sweep worker that would
re-run the sweep command, so a worker never calls ``train`` in its own process for such a trial. Instead
``TrialProcess`` (a ``trainer_fn`` stand-in) writes the trial's job to a JSON file and starts

    python -m normablate.sweep.ddp_rank JOB.json   (main() below)

whose argv is self-contained: it is rank 0, and Lightning re-launches that same command for ranks 1..D-1. The
child runs the spec's ``trainer_fn`` (``normablate.train:train``) on the trial's config; rank 0 writes the
outcome (the ``RunResult``, or "pruned" with the step and curves, or the error with its traceback) to the job's
out file, and the worker records it in Optuna exactly as a one-process trial (``trial.py``).

Around the child, the worker keeps its duties: its heartbeat thread keeps the trial alive in the storage; a
SIGINT/SIGTERM it receives (``normablate.signals.STOP``) is passed to rank 0 as SIGTERM, which (like ``normablate train``
under DDP) reduces the stop flag over the ranks, saves ``last.ckpt`` and exits 130, and the trial is re-queued;
a second Ctrl-C kills the child's process group at once. The child and its ranks are started in their own session
and die with their parent (``PR_SET_PDEATHSIG`` = SIGKILL): ``kill -9`` of the worker leaves no rank behind,
and the retry resumes from ``last.ckpt`` as for any killed trial.

Pruning: rank 0 of the child opens the trial in the storage (URL, study, trial id from the job) on first use and
reports to it; ``OptunaPruning`` broadcasts the decision so every rank stops at the same validation.

Environment: variables that would make Lightning believe an external launcher already started the ranks
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ..., ``TORCHELASTIC_RUN_ID``, and Slurm's
``SLURM_NTASKS`` of a worker started by ``sbatch``) are removed from the child's environment, so Lightning's
own subprocess launcher starts the ranks and picks a free port.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna

from ..config import RunConfig, check_hardware, to_dict
from ..errors import ConfigError
from ..plugins import import_object
from ..result import RunResult
from ..signals import STOP, die_with_parent, stop_on_signals
from .pruners import make_pruner
from .spec import DRYRUN_TRAINER, SweepSpec

ENTRY = "normablate.sweep.ddp_rank"  # runs main() below
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS")


def world_of(cfg: RunConfig) -> int:
    return cfg.trainer.devices * cfg.trainer.num_nodes


def needs_process(cfg: RunConfig, trainer_fn: str) -> bool:
    """Whether this trial runs in a child process group (DDP). The dry-run trainer trains nothing: in-process."""
    return world_of(cfg) > 1 and trainer_fn != DRYRUN_TRAINER


def cores() -> int:
    return os.cpu_count() or 1


def threads_per_rank(cfg: RunConfig, spec_threads: Any, worker_threads: int | None) -> int | None:
    """Torch threads of each rank of a DDP trial: the worker's share (``--workers N``: cores/N; one worker: all
    cores) split over its ``devices`` ranks. A ``trainer.threads`` the spec sets itself is kept (per rank)."""
    if spec_threads is not None:
        return cfg.trainer.threads
    return max(1, (worker_threads or cores()) // max(1, cfg.trainer.devices))


def check_resources(spec: SweepSpec, workers: int, n_cores: int | None = None) -> None:
    """Refuse, before any trial runs, a sweep whose trials this machine cannot host: ``trainer.num_nodes`` > 1 (a
    worker launches its trial's ranks on its own machine), a GPU/MPS asked for and absent or fewer CUDA GPUs than
    ``trainer.devices`` (``config.check_hardware``), or on CPU more processes than cores (``trainer.devices`` x
    ``--workers``). Not part of ``--check`` / ``validate_all``, so a GPU sweep can be checked on a laptop; skipped
    for the dry-run trainer (it trains nothing)."""
    if spec.trainer_fn == DRYRUN_TRAINER:
        return
    import torch

    n_cores = n_cores or cores()
    seen: set[tuple] = set()
    for point in spec.points():
        for params in spec.search_params_for_validation():
            cfg = spec.trial_config(point, params, run="check")
            t = cfg.trainer
            if (t.accelerator, t.devices, t.num_nodes) in seen:
                continue
            seen.add((t.accelerator, t.devices, t.num_nodes))
            where = f"sweep {spec.study_name!r}: grid point [{point.label(spec.axes) or 'all'}]"
            if t.num_nodes != 1:
                raise ConfigError(f"{where}: trainer.num_nodes={t.num_nodes} is not allowed in a sweep; valid: 1 (a "
                                  f"worker runs its trial's ranks on its own machine: trainer.devices of them). Run "
                                  f"multi-node jobs with `normablate train` under srun/torchrun")
            try:
                check_hardware(cfg)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            on_gpu = t.accelerator in ("gpu", "cuda", "mps") or (t.accelerator == "auto" and (
                torch.cuda.is_available() or torch.backends.mps.is_available()))
            if not on_gpu and t.devices * workers > n_cores:
                raise ConfigError(
                    f"{where}: trainer.devices={t.devices} x --workers {workers} = {t.devices * workers} CPU "
                    f"processes, but this machine has {n_cores} cores; allowed: trainer.devices x --workers <= "
                    f"{n_cores} (use --workers {max(1, n_cores // t.devices)}"
                    + (f" or trainer.devices<={max(1, n_cores // workers)}" if n_cores >= workers else "") + ")")


class TrialProcessError(RuntimeError):
    """The trial failed in its child process; ``child_traceback`` is the child's own traceback."""

    def __init__(self, message: str, child_traceback: str | None = None, child_error: str | None = None) -> None:
        super().__init__(message)
        self.child_traceback, self.child_error = child_traceback, child_error


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}


class TrialProcess:
    """Runs one trial as ``python -m normablate.sweep.ddp_rank JOB`` (a ``trainer_fn`` with the same contract).

    ``pruning``: the storage URL, study name, trial id, metric, pruner spec and its ``max_steps``, or None. After
    a pruned run, ``self.pruning`` holds ``pruned_step`` and ``history`` (as ``OptunaPruning`` does)."""

    def __init__(self, trainer_fn: str, pruning: dict[str, Any] | None = None, poll: float = 0.2) -> None:
        self.trainer_fn, self.job_pruning, self.poll = trainer_fn, pruning, poll
        self.pruning = SimpleNamespace(pruned_step=None, history={}) if pruning else None

    def __call__(self, cfg: RunConfig, callbacks: list | None = None, resume: bool = False) -> RunResult:
        if callbacks:
            raise ValueError("TrialProcess: callbacks cannot cross into the trial's processes (use pruning=...)")
        with tempfile.TemporaryDirectory(prefix="normablate-trial-") as tmp:
            job, out = Path(tmp) / "job.json", Path(tmp) / "outcome.json"
            job.write_text(json.dumps({"config": to_dict(cfg), "resume": resume, "trainer_fn": self.trainer_fn,
                                       "pruning": self.job_pruning, "out": str(out), "parent": os.getpid()}))
            proc = subprocess.Popen([sys.executable, "-m", ENTRY, str(job)], env=child_env(),
                                    start_new_session=True)
            stop_due = STOP.relay()
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=self.poll)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if stop_due():  # each new signal is passed on: rank 0 checkpoints, both ranks stop
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGTERM)
            except BaseException:  # a second Ctrl-C (KeyboardInterrupt) or an error here: stop every rank now
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            return self._outcome(out, rc)

    def _outcome(self, out: Path, rc: int) -> RunResult:
        if not out.exists() and rc == -signal.SIGTERM and STOP.signum is not None:  # stopped before it could say
            raise KeyboardInterrupt("the trial's process was stopped by the signal passed on")  # (re-queued)
        if not out.exists():
            raise TrialProcessError(f"the trial's process exited with code {rc} and left no outcome (killed, or "
                                    f"out of memory?)")
        d = json.loads(out.read_text())
        if "pruned" in d:
            p = d["pruned"]
            if self.pruning is not None:
                self.pruning.pruned_step, self.pruning.history = p["step"], p["history"]
            raise optuna.TrialPruned(p["message"])
        if "error" in d:
            e = d["error"]
            if e["type"] in ("KeyboardInterrupt", "SystemExit"):
                raise KeyboardInterrupt(e["message"])
            raise TrialProcessError(f"{e['type']}: {e['message']}", e["traceback"], e["line"])
        return RunResult.from_dict(d["result"])


# ---------------------------------------------------------------------- the child (every rank)
def _open_trial(p: dict[str, Any]) -> optuna.Trial:
    from .storage import open_storage, retry

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(p["storage"], p["log_dir"])
    study = retry(lambda: optuna.load_study(study_name=p["study"], storage=storage,
                                            sampler=optuna.samplers.RandomSampler(),
                                            pruner=make_pruner(p["pruner"], p["max_steps"])))
    return retry(lambda: optuna.Trial(study, p["trial_id"]))


def _pruning_callback(p: dict[str, Any]):
    from .pruning import OptunaPruning

    class StoragePruning(OptunaPruning):
        """Rank 0 opens the worker's trial in the storage on first use; the other ranks never touch it."""

        def on_validation_end(self, trainer, pl_module) -> None:
            if self.trial is None and trainer.is_global_zero:
                self.trial = _open_trial(p)
            super().on_validation_end(trainer, pl_module)

    return StoragePruning(None, p["metric"], prune=(p.get("pruner") or {}).get("name", "none") != "none")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {ENTRY} JOB.json (started by a sweep worker)", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    die_with_parent(signal.SIGKILL)
    launched = "LOCAL_RANK" in os.environ  # a rank Lightning started (its parent is rank 0)
    if not launched and os.getppid() != job["parent"]:
        return 1  # the worker died before prctl took effect
    from lightning.pytorch.utilities import rank_zero_only

    out = Path(job["out"])

    def write(d: dict) -> None:
        if rank_zero_only.rank == 0:  # rank 0 alone speaks for the trial
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(d, default=float))
            os.replace(tmp, out)

    callbacks = [_pruning_callback(job["pruning"])] if job["pruning"] else None
    try:
        # a stop passed on while the run is set up (before train installs its own handler) carries into the run,
        # which then stops at its first step boundary, checkpointed, instead of dying with no outcome
        with stop_on_signals(STOP):
            trainer_fn = import_object(job["trainer_fn"], "trainer_fn")
            result = trainer_fn(job["config"], callbacks=callbacks, resume=job["resume"])
    except optuna.TrialPruned as e:
        cb = callbacks[0] if callbacks else None
        print(f"rank {rank_zero_only.rank}: trial pruned at step {getattr(cb, 'pruned_step', '?')}", file=sys.stderr,
              flush=True)
        write({"pruned": {"message": str(e), "step": getattr(cb, "pruned_step", None),
                          "history": getattr(cb, "history", {})}})
        return 0
    except BaseException as e:  # noqa: BLE001  reported to the worker, which records the trial as failed
        write({"error": {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-8000:],
                         "line": "".join(traceback.format_exception_only(type(e), e)).strip()}})
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return 130
        if rank_zero_only.rank != 0:  # (rank 0's traceback is printed by the worker)
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    write({"result": result.to_dict()})
    return 130 if result.status == "interrupted" else 0

