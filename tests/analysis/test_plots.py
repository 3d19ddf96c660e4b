"""Figures read on their own: human titles, n per point, distinct looks for up to 20 configurations, no LR axis
for a single-LR sweep, one meaning for the bands of the landscape figure with cut bands marked."""
from __future__ import annotations

import copy

import matplotlib
import pandas as pd
import pytest

from normablate import studies
from normablate.analysis import plots as P
from normablate.analysis.data import StudyData
from normablate.report import probes as report_probes
from normablate.sweep import load_spec

DRY = "normablate.sweep.dryrun:train"
BASE = {"model": {"backbone": "vgg11", "norm": "bn", "width": 0.125},
        "data": {"source": "cifar10", "batch_size": 32}, "trainer": {"max_steps": 40, "val_every": 10}}


def study(norms, lrs, seeds=(0, 1), description=None, histories=None, **extra_cols) -> StudyData:
    spec = {"kind": "lr_sensitivity", "study_name": "internal_name_x", "base": copy.deepcopy(BASE), "trainer_fn": DRY,
            "grid": {"model.norm": ["bn", "none"], "optim.lr": list(lrs), "seed": list(seeds)}}  # rows name the norms
    if description:
        spec["description"] = description
    spec = load_spec(spec)
    rows = [{"norm": n, "lr": lr, "seed": s, "state": "complete", "diverged": False, "task": "classification",
             "source": "../shared/data/cifar10", "final_val_acc": 0.5 + 0.01 * i + 0.001 * s, **extra_cols}
            for i, n in enumerate(norms) for lr in lrs for s in seeds]
    return StudyData("internal_name_x", "mem", spec, pd.DataFrame(rows), len(rows), histories=histories or {})


@pytest.fixture
def captured(monkeypatch):
    figs = []
    monkeypatch.setattr(P, "save", lambda fig, path: figs.append(fig) or path)
    return figs


def test_headline_is_human_and_prefers_the_description():
    assert P.headline(study(["bn", "none"], [0.1])) == "VGG-11 on CIFAR-10: BN vs none"
    assert P.headline(study(["bn", "none"], [0.1], description="BN vs none, 1000 SGD steps")) == \
        "BN vs none, 1000 SGD steps"
    assert P.pretty_backbone("resnet20") == "ResNet-20" and P.pretty_backbone("transformer_lm") == "Transformer LM"
    assert P.pretty_norm("bn(momentum=0.01)") == "BN(momentum=0.01)"
    assert P.pretty_source("synthetic", "lm") == "synthetic text"
    many = study([f"bn(momentum={m})" for m in (0.1, 0.2, 0.3, 0.4)] + ["none"], [0.1])
    assert P.headline(many) == "VGG-11 on CIFAR-10: 5 norm settings (BN, none)"


def test_figures_state_n_and_never_the_internal_name_alone(tmp_path, captured):
    d = study(["bn", "none"], [0.01, 0.1], seeds=(0, 1, 2),
              histories={i: {"train/loss": [[k, 2.3 - 0.01 * k] for k in range(20)]} for i in range(12)})
    d.trials.loc[0, "diverged"] = True  # one diverged seed: that point has 2 finished seeds
    kind = studies.get("lr_sensitivity")
    P.loss_curves(d, tmp_path)
    kind.plot(d, kind.table(d), tmp_path)
    for fig in captured:
        text = fig._suptitle.get_text()
        assert "VGG-11 on CIFAR-10: BN vs none" in text, text
        assert "n = 2–3 seeds per point" in text, text
        assert not text.startswith("internal_name_x")


def test_twenty_configurations_get_twenty_distinct_looks(tmp_path, captured):
    names = [f"n{i}" for i in range(20)]
    looks = P.styles(names)
    assert len({(matplotlib.colors.to_hex(s["color"]), s["ls"]) for s in looks.values()}) == 20
    # and on a real figure: the legend's 20 lines are 20 (colour, line style) pairs
    d = study(names, [0.1], seeds=(0,), histories={i: {"train/loss": [[k, 2.0 + 0.01 * i] for k in range(5)]}
                                                   for i in range(20)})
    P.loss_curves(d, tmp_path)
    lines = [ln for ln in captured[0].axes[0].get_lines() if ln.get_label() in names]
    assert len({(matplotlib.colors.to_hex(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 20


def test_single_lr_sweep_has_no_lr_axis(tmp_path, captured):
    d = study(["bn", "ln", "none"], [0.1])
    kind = studies.get("lr_sensitivity")
    kind.plot(d, kind.table(d), tmp_path)
    ax = captured[0].axes[0]
    assert ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bn", "ln", "none"]
    assert "0.1" in ax.get_xlabel() and "log" not in ax.get_xlabel()
    # several LRs keep the log LR axis
    captured.clear()
    d = study(["bn", "none"], [0.01, 0.1])
    kind.plot(d, kind.table(d), tmp_path)
    assert captured[0].axes[0].get_xscale() == "log"


def test_landscape_bands_are_seed_ranges_and_cut_bands_are_marked(tmp_path, captured):
    def hist(scale, spike=False):
        steps = range(0, 50, 5)
        return {"probe/loss_range": [[k, scale * (1 + 0.01 * k) + (100.0 if spike and k == 10 else 0.0)] for k in steps],
                "probe/grad_pred": [[k, scale] for k in steps], "probe/beta": [[k, scale] for k in steps]}

    histories = {0: hist(1.0), 1: hist(1.2, spike=True), 2: hist(0.3), 3: hist(0.35)}  # bn seeds 0,1; none 0,1
    d = study(["bn", "none"], [0.1], histories=histories)
    report_probes.landscape_figure(d, tmp_path)
    ax = captured[0].axes[0]
    bands = ax.collections  # one fill per norm: the seed range of the loss variation
    assert len(bands) == 2
    assert bands[0].get_paths()[0].vertices[:, 1].max() > 100  # the band spans the seeds: the spiked one is its top
    assert ax.get_ylim()[1] < 100  # robust y range: the spike is cut ...
    marks = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert marks and all(ln.get_clip_on() is False for ln in marks)  # ... and marked with a triangle at the edge
    legend_texts = [t.get_text() for t in captured[0].legends[0].get_texts()]
    assert any("beyond the axis" in t for t in legend_texts)
    assert "band: seed range (every panel)" in captured[0]._suptitle.get_text()
