"""Run measures a hypothesis may contrast (normablate.measures): the train/eval gap on the test split, measured at
the end of a run, equals the gap `normablate evaluate` measures on the same weights; probe measures are the run's
probe summary (a layer mean for per-layer series)."""
from __future__ import annotations

import math

import pytest

from normablate import measures
from normablate.config import load_config
from normablate.evaluate import evaluate_run
from normablate.train import train

BASE = ["model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=16",
        "data.train_limit=512", "data.val_limit=64", "data.val_batch_size=32", "optim.name=adamw", "optim.lr=3e-3",
        "trainer.max_steps=6", "trainer.val_every=3", "trainer.progress=false", "experiment=t"]


def test_test_split_gap_equals_evaluate_on_the_same_weights(tmp_path):
    r = train(load_config(None, [*BASE, f"trainer.log_dir={tmp_path}", "run=gap", "model.norm=bn",
                                 "trainer.precise_bn=3", "trainer.batchstat_gap=final"]))
    t = r.test
    for k in ("test/loss", "test/acc", "test/loss_batchstats", "test/acc_batchstats", "test/train_eval_gap",
              "test/loss_precise", "test/train_eval_gap_precise"):
        assert k in t and math.isfinite(t[k]), k
    assert t["test/train_eval_gap"] == pytest.approx(t["test/loss"] - t["test/loss_batchstats"], abs=1e-6)
    assert t["test/train_eval_gap_precise"] == pytest.approx(t["test/loss_precise"] - t["test/loss_batchstats"],
                                                             abs=1e-6)
    run_dir = r.run_dir
    same = {stats: evaluate_run(run_dir, "test", stats, precise_batches=3, write=False)["metrics"]
            for stats in ("running", "batch", "precise")}
    assert t["test/loss"] == pytest.approx(same["running"]["test/loss"], abs=1e-5)
    assert t["test/loss_batchstats"] == pytest.approx(same["batch"]["test/loss"], abs=1e-5)
    assert t["test/loss_precise"] == pytest.approx(same["precise"]["test/loss"], abs=1e-5)
    assert t["test/train_eval_gap"] != pytest.approx(0.0, abs=1e-6)  # 6 steps of BN: eval mode differs


def test_no_gap_pass_when_off_or_without_batch_norms(tmp_path):
    off = train(load_config(None, [*BASE, f"trainer.log_dir={tmp_path}", "run=nogap", "model.norm=bn",
                                   "trainer.batchstat_gap=off"]))
    ln = train(load_config(None, [*BASE, f"trainer.log_dir={tmp_path}", "run=gn", "model.norm=gn"]))
    for r in (off, ln):
        assert "test/loss" in r.test
        assert not [k for k in r.test if "batchstats" in k or "gap" in k], r.test


def test_probe_value_is_the_series_or_its_layer_mean():
    summary = {"probe/grad_pred": 2.5, "probe/ics_l2/a": 1.0, "probe/ics_l2/b": 3.0, "probe/ics_cos/a": 0.5}
    assert measures.probe_value("probe/grad_pred", summary) == 2.5
    assert measures.probe_value("probe/ics_l2", summary) == 2.0
    assert measures.probe_value("probe/ics_cos", summary) == 0.5
    assert measures.probe_value("probe/beta", summary) is None


def test_unmet_names_each_missing_switch():
    cfg = {"probes.enabled": True, "probes.landscape": False, "trainer.batchstat_gap": "off", "trainer.precise_bn": 0}
    assert measures.unmet(measures.get("probe/beta"), cfg.get) == ["probes.landscape=False (must be true)"]
    assert measures.unmet(measures.get("test/train_eval_gap_precise"), cfg.get) == [
        "trainer.batchstat_gap='off' (must be every or final)", "trainer.precise_bn=0 (must be > 0)"]
    cfg.update({"probes.landscape": True, "trainer.batchstat_gap": "final", "trainer.precise_bn": 50})
    assert measures.unmet(measures.get("probe/beta"), cfg.get) == []
    assert measures.unmet(measures.get("test/train_eval_gap_precise"), cfg.get) == []
