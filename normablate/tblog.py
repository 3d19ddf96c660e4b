"""TensorBoard logging of a run: the HPARAMS session of each run, and no constant ``epoch`` scalar.

Lightning's ``log_hyperparams`` writes, into every run, an hparams *experiment* summary listing each key as not
differing; TensorBoard takes the first such summary as the whole experiment's, so every column is marked
``differs: False`` and the dashboard opens on constant ``data.*`` columns with ``model.norm``, ``optim.lr`` and
``seed`` hidden. We write only the run's *session start* (its hparam values): TensorBoard then builds the experiment
from all runs' sessions, marks exactly the keys whose values differ across the runs of the logdir (what a sweep
swept), lists them first, and offers every scalar tag (``val/*``, ``hp/*``) as a metric.

Hand-written because Lightning has no switch for it; the protos are built by ``torch.utils.tensorboard``.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


class RunLogger(TensorBoardLogger):
    """``TensorBoardLogger`` without the ``epoch`` scalar (our training stream is one endless epoch: always 0), which
    remembers the step of the last validation so the final ``hp/*`` metrics are written at that same step (the
    HPARAMS table then reads ``val/*`` and ``hp/*`` of one and the same evaluation)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_step: int | None = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if any(k.startswith("val/") for k in metrics):
            self.val_step = step
        if metrics:
            super().log_metrics(metrics, step)

    def hp_step(self, fallback: int) -> int:
        """The step for the final ``hp/*`` metrics: the last validation's (Lightning's step axis), else ``fallback``."""
        return self.val_step if self.val_step is not None else fallback


def log_session(logger: TensorBoardLogger, hparams: dict[str, Any]) -> None:
    """Record this run's hparam values as an HPARAMS session (no experiment summary: see the module doc)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    _experiment, start, end = hparams_summary(hparams, {})
    writer = logger.experiment._get_file_writer()
    writer.add_summary(start)
    writer.add_summary(end)
    writer.flush()
