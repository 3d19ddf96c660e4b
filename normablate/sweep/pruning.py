"""Optuna pruning for Lightning runs: report the validation metric at each validation, stop hopeless trials.

About twenty lines, so no dependency on ``optuna-integration`` (whose ``PyTorchLightningPruningCallback`` also
pins Lightning versions and is known to break under DDP). Rank-aware: under DDP only global rank 0 reports to
Optuna and asks the pruner; its decision is broadcast, so every rank stops at the same validation together
(the metric itself is already reduced over ranks). Other ranks may pass ``trial=None``. In a sweep's DDP trial
(``ddp_trial.py``) the ranks run in a child of the worker: there rank 0 opens the worker's trial in the storage.
"""
from __future__ import annotations

import math

import lightning as L
import optuna


class OptunaPruning(L.Callback):
    """After each validation: ``trial.report(metric, global_step)``; raise ``TrialPruned`` if the pruner says so
    (``prune=False``: report only, for the learning curves of a sweep without a pruner).

    Keeps the run's curves (from any callback with a ``history`` attribute, i.e. ``RunMonitor``) so a pruned
    trial's record still has them.
    """

    def __init__(self, trial: optuna.Trial | None, metric: str, prune: bool = True) -> None:
        self.trial, self.metric = trial, metric
        self.prune = prune  # False: only report (the learning curve), never ask the pruner
        self.pruned_step: int | None = None
        self.history: dict = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value, step = float(trainer.callback_metrics[self.metric]), int(trainer.global_step)
        if not math.isfinite(value):
            return  # a diverging run is stopped (and recorded) by the run itself
        prune = False
        if getattr(trainer, "is_global_zero", True) and self.trial is not None:  # (the dry-run trainer: one rank)
            self.trial.report(value, step)
            prune = self.prune and self.trial.should_prune()
        if getattr(trainer, "world_size", 1) > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_step = step
            for cb in trainer.callbacks:
                if isinstance(getattr(cb, "history", None), dict) and cb is not self:
                    self.history = {k: [list(p) for p in v] for k, v in cb.history.items()}
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric}={value:.4g})")
