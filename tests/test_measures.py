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


def test_no_gap_pass_when_off_and_a_zero_gap_without_batch_norms(tmp_path):
    off = train(load_config(None, [*BASE, f"trainer.log_dir={tmp_path}", "run=nogap", "model.norm=bn",
                                   "trainer.batchstat_gap=off"]))  # unquoted off: YAML's false, read as "off"
    assert "test/loss" in off.test and not [k for k in off.test if "batchstats" in k or "gap" in k], off.test
    gn = train(load_config(None, [*BASE, f"trainer.log_dir={tmp_path}", "run=gn", "model.norm=gn",
                                  "trainer.precise_bn=3"]))
    # no batch-statistics norm: no second pass, and the gap a hypothesis contrasts is exactly 0 (same function)
    assert gn.test["test/train_eval_gap"] == 0.0 and gn.test["test/train_eval_gap_precise"] == 0.0
    assert not [k for k in gn.test if "batchstats" in k or "precise" in k.split("/")[1][:7]], gn.test


def test_probe_value_is_the_series_or_its_layer_mean_without_the_first_layer():
    summary = {"probe/grad_pred": 2.5, "probe/beta": None, "probe/ics_l2/first": 0.0, "probe/ics_cos/first": 1.0,
               "probe/ics_l2/a": 1.0, "probe/ics_l2/b": 3.0, "probe/ics_cos/a": 0.5, "probe/ics_cos/b": 0.7}
    assert measures.probe_value("probe/grad_pred", summary) == 2.5
    assert measures.ics_layers(summary) == ["a", "b"]  # the first layer's ICS is 0 by construction: left out
    assert measures.probe_value("probe/ics_l2", summary) == 2.0
    assert measures.probe_value("probe/ics_cos", summary) == pytest.approx(0.6)
    assert measures.probe_value("probe/beta", summary) is None  # non-finite, stored as None
    assert measures.probe_value("probe/loss_range", summary) is None


def test_first_layer_ics_is_exactly_zero_in_a_probed_run(tmp_path):
    """What ics_layers relies on: the recorded ICS of a layer with no earlier parameter is exactly 0.0."""
    r = train(load_config(None, [*BASE, f"trainer.log_dir={tmp_path}", "run=probed", "model.norm=bn",
                                 "trainer.max_steps=4", "probes.enabled=true", "probes.every=2",
                                 "probes.layers=[stem.conv, blocks.3.c2]", "trainer.batchstat_gap=off"]))
    assert r.probes["probe/ics_l2/stem.conv"] == 0.0 and r.probes["probe/ics_l2/blocks.3.c2"] > 0.0
    assert measures.ics_layers(r.probes) == ["blocks.3.c2"]


def test_unmet_names_each_missing_switch():
    cfg = {"probes.enabled": True, "probes.landscape": False, "trainer.batchstat_gap": "off", "trainer.precise_bn": 0}
    assert measures.unmet(measures.get("probe/beta"), cfg.get) == ["probes.landscape=False (must be true)"]
    assert measures.unmet(measures.get("test/train_eval_gap_precise"), cfg.get) == [
        "trainer.batchstat_gap='off' (must be every or final)", "trainer.precise_bn=0 (must be > 0)"]
    cfg.update({"probes.landscape": True, "trainer.batchstat_gap": "final", "trainer.precise_bn": 50})
    assert measures.unmet(measures.get("probe/beta"), cfg.get) == []
    assert measures.unmet(measures.get("test/train_eval_gap_precise"), cfg.get) == []
