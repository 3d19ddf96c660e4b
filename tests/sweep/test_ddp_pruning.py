"""Optuna pruning when a trial runs DDP: only global rank 0 reports to Optuna; the decision reaches every rank
(2 gloo processes; the callback sees a stand-in for Lightning's trainer whose broadcast is a real gloo one)."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
import torch
import torch.distributed as dist

from normablate.sweep.pruning import OptunaPruning

from support.dist import run_ranks


def _broadcast(obj, src=0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _rank(rank: int, world: int) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Every rank holds a trial of its own in-memory study: only rank 0's may receive reports.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    cb = OptunaPruning(trial, "val/loss")
    out = {"pruned_at": None}
    for step, value in ((10, 0.5), (20, 0.8), (30, 2.0), (40, 0.1)):  # 2.0 > upper: pruned at step 30
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/loss": torch.tensor(value)},
                                  global_step=step, is_global_zero=rank == 0, world_size=world, callbacks=[],
                                  strategy=SimpleNamespace(broadcast=_broadcast))
        try:
            cb.on_validation_end(trainer, None)
        except optuna.TrialPruned:
            out["pruned_at"] = step
            break
    out["reports"] = dict(study.trials[0].intermediate_values)
    return out


def test_rank_zero_reports_and_every_rank_stops_together(tmp_path):
    r0, r1 = run_ranks(_rank, 2, (), tmp_path)
    assert r0["pruned_at"] == r1["pruned_at"] == 30
    assert r0["reports"] == pytest.approx({10: 0.5, 20: 0.8, 30: 2.0})
    assert r1["reports"] == {}, "a non-zero rank must not report to Optuna"
