"""Hypotheses on run measures (normablate.measures): the spec refuses a measure no compared run would measure,
naming the grid point and the config key; a probe measure is judged on the runs' probe summaries with its own
direction; a gap measure at each side's best LR chooses the LR on the study metric, not on the gap."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normablate.analysis import verdicts as V
from normablate.analysis.data import StudyData
from normablate.errors import ConfigError
from normablate.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "runs" / "quick_synthetic.yaml")


def spec(metric, at=None, overrides=None, lrs=(0.01, 0.1)):
    h = {"id": "h", "claim": '"BN makes the landscape smoother" (Santurkar et al. 2018, Sec. 3.1)',
         "type": "superiority",
         "contrast": {"a": {"model.norm": "bn"}, "b": {"model.norm": "none"}, "metric": metric,
                      "at": at or {"fixed": {"optim.lr": 0.1}}}}
    return load_spec({"kind": "grid", "base": BASE, "study_name": "m", "metric": "val/acc",
                      "overrides": dict(overrides or {}),
                      "grid": {"seed": [0, 1, 2, 3], "optim.lr": list(lrs), "model.norm": ["bn", "none"]},
                      "hypotheses": [h]})


LAND = {"probes.enabled": True, "probes.landscape": True, "probes.ics": True}


def test_a_measure_the_runs_would_not_take_is_refused_before_any_run():
    with pytest.raises(ConfigError) as e:
        spec("probe/grad_pred")  # probes off in the base config
    msg = str(e.value)
    assert "hypothesis 'h'" in msg and "probe/grad_pred" in msg and "probes.enabled=False (must be true)" in msg
    assert "grid point [" in msg
    with pytest.raises(ConfigError, match=r"trainer.batchstat_gap='off' \(must be every or final\)"):
        spec("test/train_eval_gap", overrides={"trainer.batchstat_gap": "off"})
    with pytest.raises(ConfigError, match=r"trainer.precise_bn=0 \(must be > 0\)"):
        spec("test/train_eval_gap_precise")
    with pytest.raises(ConfigError, match="or a run measure: test/train_eval_gap, .*probe/grad_pred"):
        spec("probe/grad_prediction", overrides=LAND)
    assert spec("probe/grad_pred", overrides=LAND).hypotheses[0]["contrast"]["metric"] == "probe/grad_pred"
    assert spec("test/train_eval_gap").hypotheses  # batchstat_gap defaults to every


def test_only_the_compared_points_must_measure_it():
    def load(enabled_at):
        h = {"id": "h", "claim": '"BN makes the landscape smoother" (Santurkar et al. 2018, Sec. 3.1)',
             "type": "superiority", "contrast": {"a": {"optim.lr": 0.01}, "b": {"optim.lr": 0.1},
                                                 "metric": "probe/beta",
                                                 "at": {"fixed": {"model.norm": "bn", "probes.enabled": enabled_at}}}}
        return load_spec({"kind": "grid", "base": BASE, "study_name": "m", "metric": "val/acc",
                          "grid": {"seed": [0, 1], "optim.lr": [0.01, 0.1], "model.norm": ["bn", "none"],
                                   "probes.enabled": [True, False]}, "hypotheses": [h]})

    assert load(True).hypotheses[0]["contrast"]["at"]["fixed"]["probes.enabled"] is True  # unprobed: not compared
    unprobed = r"grid point \[seed=0 lr=0.01 norm=bn enabled=False\]: .*probes.enabled=False \(must be true\)"
    with pytest.raises(ConfigError, match=unprobed):
        load(False)


def _rows(s, value, val_acc=None, diverged=()):
    rows, probes = [], {}
    for p in s.points():
        norm, lr, seed = p.values["model.norm"], p.values["optim.lr"], p.values["seed"]
        rows.append({"trial": p.index, "point": p.index, "seed": seed, "lr": lr, "norm": norm, "state": "complete",
                     "diverged": (norm, lr, seed) in diverged,
                     "final_val_acc": (val_acc or (lambda n, x, sd: 0.5))(norm, lr, seed),
                     "final_test_acc": 0.5, **value(norm, lr, seed)})
        probes[len(rows) - 1] = value(norm, lr, seed).get("_probes", {})
    for r in rows:
        r.pop("_probes", None)
    return StudyData("m", "mem", s, pd.DataFrame(rows), s.total, probe_means=probes)


def test_probe_measure_judged_on_probe_summaries_with_its_direction():
    s = spec("probe/ics_l2", overrides=LAND)
    noise = np.random.default_rng(0).normal(0, 0.05, 64)

    def value(norm, lr, seed):  # BN's layer-mean ICS is 1.0 lower; two layers each
        base = (2.0 if norm == "bn" else 3.0) + noise[seed]
        return {"_probes": {"probe/ics_l2/conv1": base - 0.5, "probe/ics_l2/conv2": base + 0.5,
                            "probe/grad_pred": 9.0}}

    (v,) = V.evaluate(_rows(s, value))
    assert v.split == "train" and v.direction == "minimize"
    assert v.test.estimate == pytest.approx(-1.0, abs=1e-9)  # A − B in the measure's units; paired seeds
    assert v.word == "supported"  # lower is the improvement for ICS
    assert "mean over each run's probed steps" in " ".join(v.notes)
    s2 = spec("probe/ics_cos", overrides=LAND)  # maximized: the same numbers as cos would contradict
    (w,) = V.evaluate(_rows(s2, lambda n, x, sd: {"_probes": {"probe/ics_cos/c": (0.2 if n == "bn" else 0.9)
                                                               + noise[sd], "probe/ics_l2/c": 1.0}}))
    assert w.direction == "maximize" and w.word == "contradicted"


def test_gap_at_best_lr_chooses_the_lr_on_the_study_metric():
    s = spec("test/train_eval_gap", at="best_lr")
    # val/acc is best at LR 0.1 for both norms; the gap is smallest at LR 0.01. Chosen on val/acc: the gaps at 0.1
    gaps = {("bn", 0.01): 0.0, ("bn", 0.1): 0.30, ("none", 0.01): 0.0, ("none", 0.1): 0.10}
    noise = np.random.default_rng(1).normal(0, 0.01, 64)
    data = _rows(s, lambda n, x, sd: {"final_test_train_eval_gap": gaps[(n, x)] + noise[sd]},
                 val_acc=lambda n, x, sd: 0.6 if x == 0.1 else 0.4)
    (v,) = V.evaluate(data, samples=500)
    assert v.dist.chosen == (0.1, 0.1)
    assert v.test.estimate == pytest.approx(0.20, abs=1e-9)
    assert v.split == "test" and v.word == "contradicted"  # BN's gap is larger: "BN has the smaller gap" fails
    assert "chosen on final val/acc" in v.what


def test_a_diverged_run_is_left_out_of_a_probe_measure():
    s = spec("probe/beta", overrides=LAND)
    noise = np.random.default_rng(2).normal(0, 0.5, 64)

    def value(norm, lr, seed):  # none diverged at seed 3: its probes cover a few early steps, a huge beta
        beta = (10.0 if norm == "bn" else 20.0) + noise[seed]
        return {"_probes": {"probe/beta": 1e6 if (norm, lr, seed) == ("none", 0.1, 3) else beta}}

    (v,) = V.evaluate(_rows(s, value, diverged={("none", 0.1, 3)}))
    assert v.test.n_b == 3 and v.test.estimate == pytest.approx(-10.0, abs=1.5)
    assert v.word == "supported" and "diverged runs left out (A 0, B 1)" in " ".join(v.notes)


def test_a_measure_no_run_recorded_says_so():
    s = spec("probe/grad_pred", overrides=LAND)
    (v,) = V.evaluate(_rows(s, lambda n, x, sd: {"_probes": {}}))
    assert v.word == "inconclusive" and any("no run recorded probe/grad_pred" in n for n in v.notes), v.notes
