"""A run's loggers (``trainer.loggers``: TensorBoard, CSV, MLflow, W&B) and its TensorBoard HPARAMS session.

**HPARAMS.** Lightning's ``log_hyperparams`` writes, into every run, an hparams *experiment* summary listing each
key as not differing; TensorBoard takes the first such summary as the whole experiment's, so every column is marked
``differs: False`` and the dashboard opens on constant ``data.*`` columns with ``model.norm``, ``optim.lr`` and
``seed`` hidden. We write only the run's *session start* (its hparam values): TensorBoard then builds the experiment
from all runs' sessions, marks exactly the keys whose values differ across the runs of the logdir (what a sweep
swept) and lists them first.

Without an experiment summary TensorBoard's metric columns are every scalar tag of the session's run folder and its
sub-folders, sorted by name (``backend_context._compute_metric_names``), and the dashboard shows the first five
(``tf-hparams-query-pane``: ``displayed: i < 5``). Had the session lived in the run folder, those five would have
been ``grad_norm`` and whatever sorted next, never the answer. So the session and the run's final metrics live in
the run's sub-folder ``hparams/`` (``HPARAMS_DIR``), which holds nothing else, and the names sort the answer first:

    hp/test_acc  hp/test_loss  hp/val_acc  hp/val_loss     (LM: hp/test_loss hp/test_ppl hp/val_loss hp/val_ppl)
    run/diverged  run/steps  run/test_<m>_at_best  run/throughput  run/train_eval_gap

so the default view shows the study's metric (validation, what selection used), its test counterpart (what a
report states), both losses and ``run/diverged``. A metric that does not apply to a run (``run/train_eval_gap``
for a norm without batch statistics; ``test`` for an interrupted run) or is not finite is left out of that run,
never written as NaN; the parallel-coordinates view drops a session that lacks a *shown* metric, so only metrics
every finished run has are among the five shown by default (a diverged run whose loss is inf lacks ``hp/*_loss``).

Hand-written because Lightning has no switch for it; the protos are built by ``torch.utils.tensorboard``.

**Other loggers** are Lightning's own (``CSVLogger``, ``MLFlowLogger``, ``WandbLogger``); each gets the flattened
config as its hyperparameters and the final metrics above, the way its users look for them: CSV ``hparams.yaml`` +
``metrics.csv`` in the run folder; MLflow params + metrics (store: ``$MLFLOW_TRACKING_URI``, else the local file
store ``<log_dir>/mlruns``); W&B config + summary (``$WANDB_MODE=offline`` for no account; files under the run
folder). A resumed run continues the same MLflow / W&B run (its id is kept in the run folder); ``finish`` ends
each logger's run when ``train`` returns (a sweep worker runs many trials in one process).
"""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from . import tasks

HPARAMS_DIR = "hparams"  # the run's sub-folder holding its HPARAMS session and final metrics (module doc)


class _NoEpoch:
    """Drops Lightning's ``epoch`` metric (our training stream is one endless epoch: always 0)."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)  # type: ignore[misc]


class RunLogger(_NoEpoch, TensorBoardLogger):
    """``TensorBoardLogger`` without the ``epoch`` scalar, which remembers the step of the last validation so the
    final metrics are written at that same step (the HPARAMS table then reads the values of one evaluation)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_step: int | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if any(k.startswith("val/") for k in metrics):
            self.val_step = step
        super().log_metrics(metrics, step)

    def hp_step(self, fallback: int) -> int:
        """The step for the final metrics: the last validation's (Lightning's step axis), else ``fallback``."""
        return self.val_step if self.val_step is not None else fallback


class RunCSVLogger(_NoEpoch, CSVLogger):
    """``CSVLogger`` writing ``metrics.csv`` and ``hparams.yaml`` into the run folder itself. Lightning's deletes an
    existing ``metrics.csv`` whenever the folder is not empty (ours always holds ``config.yaml``); a resumed run
    appends to it instead, a fresh one starts it anew."""

    def __init__(self, *args: Any, resume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume = resume

    @property
    def experiment(self):
        if self._experiment is None:
            from lightning.pytorch.loggers.csv_logs import ExperimentWriter

            metrics = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
            if not self._resume and metrics.exists():
                metrics.unlink()
            original = ExperimentWriter._check_log_dir_exists
            ExperimentWriter._check_log_dir_exists = lambda writer: None  # (its warning and deletion: see above)
            try:
                self._experiment = ExperimentWriter(log_dir=self.log_dir)
            finally:
                ExperimentWriter._check_log_dir_exists = original
        return self._experiment


def _run_id(run_dir: Path, name: str, make) -> str:
    """The id of this run in an external tracker, kept in the run folder so a resumed run continues the same one."""
    path = run_dir / f".{name}_run_id"
    if path.exists():
        return path.read_text().strip()
    rid = make()
    if rank_zero_only.rank != 0:  # (only rank 0 logs; the others' logger is never used)
        return rid
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(rid)
    return rid


def make_loggers(names: list[str], log_dir: str, experiment: str, run: str, resume: bool = False) -> list[Logger]:
    """Lightning loggers for ``trainer.loggers``, in that order (TensorBoard's first when present: ``trainer.logger``
    is the first one)."""
    run_dir = Path(log_dir) / experiment / run
    out: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            out.append(RunLogger(save_dir=log_dir, name=experiment, version=run, default_hp_metric=False))
        elif name == "csv":
            out.append(RunCSVLogger(save_dir=log_dir, name=experiment, version=run, resume=resume))
        elif name == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # the local file store beside the runs; MLflow 3 refuses a file store unless allowed, so we
                # allow it for this default only (a server or sqlite:///... store: set MLFLOW_TRACKING_URI)
                uri = (Path(log_dir).resolve() / "mlruns").as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            id_file = run_dir / ".mlflow_run_id"  # (MLflow makes the id; it is kept once the run exists)
            lg = _mlflow_class()(experiment_name=experiment, run_name=run, tracking_uri=uri,
                                 run_id=id_file.read_text().strip() if id_file.exists() else None)
            lg.id_file = id_file
            out.append(lg)
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            rid = _run_id(run_dir, "wandb", lambda: uuid.uuid4().hex[:16])
            out.append(WandbLogger(project=experiment, name=run, save_dir=str(run_dir), id=rid, resume="allow"))
    return out


def _mlflow_class():
    """The MLflow logger class, built on first use (mlflow is optional)."""
    from lightning.pytorch.loggers import MLFlowLogger

    class MLFlow(_NoEpoch, MLFlowLogger):
        """``MLFlowLogger`` that records its run id in the run folder (a resumed run continues the same MLflow run)."""

        id_file: Path | None = None

        @property
        def experiment(self):
            client = super().experiment
            if self.id_file is not None and self._run_id and not self.id_file.exists():
                self.id_file.write_text(self._run_id)
            return client

    return MLFlow


def tensorboard_of(loggers: list[Logger]) -> RunLogger | None:
    return next((lg for lg in loggers if isinstance(lg, RunLogger)), None)


def log_hparams(loggers: list[Logger], hparams: dict[str, Any]) -> None:
    """Each logger's hyperparameters: TensorBoard an HPARAMS session (module doc), the others their own form."""
    for lg in loggers:
        if isinstance(lg, RunLogger):
            log_session(lg, hparams)
        else:
            lg.log_hyperparams(hparams)


def hparams_dir(logger: TensorBoardLogger) -> Path:
    return Path(logger.log_dir) / HPARAMS_DIR


def log_session(logger: TensorBoardLogger, hparams: dict[str, Any]) -> None:
    """Record this run's hparam values as an HPARAMS session in ``<run>/hparams/`` (no experiment summary)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    _experiment, start, end = hparams_summary(hparams, {})
    with SummaryWriter(log_dir=str(hparams_dir(logger))) as w:
        writer = w._get_file_writer()
        writer.add_summary(start)
        writer.add_summary(end)


def _finite(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def final_metrics(result: Any, task: str) -> dict[str, float]:
    """The run's final metrics under the HPARAMS names (module doc); non-finite or inapplicable ones left out."""
    m = tasks.get(task).primary.split("/", 1)[1]  # the task's primary metric: acc, ppl
    test = getattr(result, "test", None) or {}  # (RunResult.test: the test split, evaluated once at the end)
    out: dict[str, float] = {}
    for split, src in (("val", result.final), ("test", test)):
        for name in ("loss", m):
            v = _finite(src.get(f"{split}/{name}"))
            if v is not None:
                out[f"hp/{split}_{name}"] = v
    out["run/diverged"] = float(result.status == "diverged")
    out["run/steps"] = float(result.steps)
    extra = {"run/throughput": result.throughput, "run/train_eval_gap": result.final.get("val/train_eval_gap")}
    if test:  # test at the best validation checkpoint; the final one's test where that is the best (empty dict)
        at_best = getattr(result, "test_at_best", None) or test
        extra[f"run/test_{m}_at_best"] = at_best.get(f"test/{m}")
    out.update({k: f for k, v in extra.items() if (f := _finite(v)) is not None})
    return out


def log_final(loggers: list[Logger], metrics: dict[str, float], step: int) -> None:
    """The final metrics to every logger: TensorBoard's into the HPARAMS folder (the session's metrics), the others'
    as their last metrics (W&B: also its run summary)."""
    for lg in loggers:
        if isinstance(lg, RunLogger):
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(hparams_dir(lg))) as w:
                for k, v in metrics.items():
                    w.add_scalar(k, v, global_step=step)
            continue
        lg.log_metrics(metrics, step=step)
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update(metrics)


def finish(loggers: list[Logger], status: str) -> None:
    """Close every logger at the run's end (``status``: Lightning's "success" / "interrupted"). A W&B run is also
    finished (Lightning leaves it open until the process exits; a sweep worker runs many trials in one process,
    and an offline run writes its config and summary files only when finished)."""
    for lg in loggers:
        # MLflow knows FINISHED / FAILED / KILLED only (Lightning maps "success" and passes anything else through)
        lg.finalize("KILLED" if status == "interrupted" and type(lg).__name__ == "MLFlow" else status)
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish(exit_code=0 if status == "success" else 1)
