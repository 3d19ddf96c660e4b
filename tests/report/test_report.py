"""Reports: the numbers in summary.csv are the trials' numbers; study-kind measures; figures are written."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from normablate.errors import ConfigError
from normablate import studies
from normablate.analysis.data import StudyData
from normablate.analysis.stats import mean_ci, t975
from normablate.report import write_report
from normablate.sweep import load_spec, run_sweep
from normablate.sweep.storage import open_storage

DRY = "normablate.sweep.dryrun:train"
BASE = {
    "model": {"backbone": "vgg11", "norm": "bn", "width": 0.125},
    "data": {"source": "synthetic", "batch_size": 32, "train_limit": 512, "val_limit": 256},
    "trainer": {"max_steps": 40, "val_every": 10},
}


def make_spec(tmp_path: Path, **kw) -> dict:
    d = {"kind": "lr_sensitivity", "study_name": "r", "base": copy.deepcopy(BASE), "log_dir": str(tmp_path / "logs"),
         "trainer_fn": DRY, "grid": {"model.norm": ["bn", "ln", "none"], "optim.lr": [0.03, 0.1, 1.0],
                                     "seed": [0, 1]}, "tolerance": 0.05}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}  # tolerance=None: drop the key


def study_trials(res) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=res.study_name, storage=open_storage(res.storage)).get_trials()


def test_t_quantiles_and_ci():
    assert t975(1) == 12.706 and t975(30) == 2.042 and t975(45) == 2.021 and t975(5000) == 1.960
    m, ci, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and ci == pytest.approx(4.303 / math.sqrt(3))
    m, ci, n = mean_ci([0.5, None, float("nan")])
    assert (m, n) == (0.5, 1) and math.isnan(ci)


def test_lr_sweep_report_numbers_equal_the_trials(tmp_path):
    res = run_sweep(make_spec(tmp_path))
    assert res.complete and res.counts.total == 18 and res.counts.diverged == 2  # none diverges at lr=1
    out = write_report("r", storage=res.storage)
    assert out == tmp_path / "logs" / "r" / "report"
    for f in ("summary.md", "summary.csv", "trials.csv", "lr_sensitivity.csv", "loss_curves.png",
              "lr_sensitivity.png"):
        assert (out / f).stat().st_size > 0, f

    # summary.csv == mean (and t-CI) over seeds of what each trial recorded
    summ = pd.read_csv(out / "summary.csv")
    assert len(summ) == 9 and list(summ.columns[:3]) == ["norm", "lr", "n"]
    trials = [t for t in study_trials(res) if t.state == TrialState.COMPLETE]
    assert len(trials) == 18
    for _, row in summ.iterrows():
        mine = [t for t in trials if t.user_attrs["config"]["model"]["norm"] == row["norm"]
                and t.user_attrs["config"]["optim"]["lr"] == pytest.approx(row["lr"])]
        assert len(mine) == row["n"] == 2
        ok = [t for t in mine if not t.user_attrs["diverged"]]
        assert row["n_diverged"] == 2 - len(ok)
        for key, c in (("final", "final_val_acc"), ("best", "best_val_loss")):
            vals = [t.user_attrs[key][c.split("_", 1)[1].replace("val_", "val/")] for t in ok]
            m, ci, _ = mean_ci(vals)
            if ok:
                assert row[f"{c}_mean"] == pytest.approx(m) and row[f"{c}_ci95"] == pytest.approx(ci)
            else:
                assert math.isnan(row[f"{c}_mean"])
        walls = [t.user_attrs["wall_time"] for t in ok]
        if ok:
            assert row["wall_time_mean"] == pytest.approx(sum(walls) / len(walls))
            assert row["train_loss_auc_mean"] == pytest.approx(
                sum(t.user_attrs["train_loss_auc"] for t in ok) / len(ok))

    # the diverging LR shows as diverged
    lr = pd.read_csv(out / "lr_sensitivity.csv").set_index("norm")
    assert lr.loc["none", "diverged_lrs"] == "1(2/2)"
    assert lr.loc["none", "lr=1"] == "diverged"
    assert pd.isna(lr.loc["bn", "diverged_lrs"])
    md = (out / "summary.md").read_text()
    assert "| none | 0.1 |" in md and "diverged" in md and "![LR sensitivity](lr_sensitivity.png)" in md
    # best LR and width agree with the recorded numbers
    for norm in ("bn", "ln", "none"):
        means = {}
        for x in (0.03, 0.1, 1.0):
            v = [t.user_attrs["final"]["val/acc"] for t in trials if t.user_attrs["config"]["model"]["norm"] == norm
                 and t.user_attrs["config"]["optim"]["lr"] == x and not t.user_attrs["diverged"]]
            if len(v) == 2:
                means[x] = sum(v) / 2
        best = max(means, key=means.get)
        assert lr.loc[norm, "best_lr"] == pytest.approx(best)  # chosen on validation
        test = [t.user_attrs["test"]["test/acc"] for t in trials if t.user_attrs["config"]["model"]["norm"] == norm
                and t.user_attrs["config"]["optim"]["lr"] == best and not t.user_attrs["diverged"]]
        assert lr.loc[norm, "best_mean"] == pytest.approx(sum(test) / len(test))  # stated from the test split


def _fake_data(per_lr: dict[float, list], direction="maximize", tol=0.05) -> StudyData:
    spec = load_spec({"kind": "lr_sensitivity", "study_name": "x", "base": BASE, "trainer_fn": DRY,
                      "grid": {"optim.lr": list(per_lr), "seed": [0, 1]}, "tolerance": tol,
                      "metric": "val/acc" if direction == "maximize" else "val/loss", "direction": direction})
    rows = []
    for lr, vals in per_lr.items():
        for s, v in enumerate(vals):
            rows.append({"norm": "bn", "lr": lr, "seed": s, "state": "complete", "diverged": v is None,
                         "final_val_acc" if direction == "maximize" else "final_val_loss": v})
    return StudyData("x", "mem", spec, pd.DataFrame(rows), len(rows))


def test_lr_width_definition():
    # best at 0.1; 1.0 within 0.05; 0.01 within too but cut off by 0.03 (not within): range [0.1, 1] = 1 decade
    d = _fake_data({0.01: [0.78, 0.78], 0.03: [0.5, 0.5], 0.1: [0.8, 0.8], 1.0: [0.77, 0.77], 10.0: [None, 0.1]})
    r = studies.get("lr_sensitivity").table(d).iloc[0]
    assert r["best_lr"] == 0.1 and (r["usable_lr_min"], r["usable_lr_max"]) == (0.1, 1.0)
    assert r["width_decades"] == pytest.approx(1.0) and r["diverged_lrs"] == "10(1/2)"
    # a diverged seed makes an LR unusable even if the other seed is good; minimize works mirrored
    d = _fake_data({0.1: [1.0, 1.0], 0.3: [1.02, None], 1.0: [1.04, 1.04]}, direction="minimize", tol=0.05)
    r = studies.get("lr_sensitivity").table(d).iloc[0]
    assert r["best_lr"] == 0.1 and r["usable_lr_max"] == 0.1 and r["width_decades"] == 0.0


def test_duplicates_counted_once_and_noted(tmp_path):
    res = run_sweep(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1, 0.3]}))
    study = optuna.load_study(study_name="r", storage=open_storage(res.storage))
    first = next(t for t in study.get_trials() if t.user_attrs["point"] == 0)
    study.add_trial(optuna.trial.create_trial(  # as if two machines had both run point 0
        params=first.params, distributions=first.distributions, value=0.0,
        user_attrs={**first.user_attrs, "final": {"val/acc": 0.0, "val/loss": 9.0}}))
    out = write_report("r", storage=res.storage)
    summ = pd.read_csv(out / "summary.csv")
    assert list(summ["n"]) == [1, 1]
    assert summ["final_val_acc_mean"].iloc[0] == pytest.approx(first.user_attrs["final"]["val/acc"])
    assert "duplicate trial(s) [2] ignored" in (out / "summary.md").read_text()


def test_report_of_unknown_study_lists_the_known_ones(tmp_path):
    res = run_sweep(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]}))
    with pytest.raises(ConfigError, match="no study 'nope'.*studies there: r"):
        write_report("nope", storage=res.storage)


def test_batch_size_convergence_and_search_reports(tmp_path):
    bs = run_sweep(make_spec(tmp_path, kind="batch_size", study_name="b", tolerance=None,
                             grid={"model.norm": ["bn", "ln"], "data.batch_size": [8, 32, 128], "seed": [0, 1]},
                             lr_scaling="sqrt", budget={"samples": 2560}))
    out = write_report("b", storage=bs.storage)
    table = pd.read_csv(out / "batch_size.csv").set_index("norm")
    assert {"bs=8", "bs=32", "bs=128", "spread"} <= set(table.columns)
    assert "(lr 0.05)" in table.loc["bn", "bs=8"]  # sqrt rule: 0.1 * sqrt(8 / 32)
    summ = pd.read_csv(out / "summary.csv").set_index(["norm", "batch_size"])
    assert summ.loc[("bn", 8), "final_val_acc_mean"] < summ.loc[("ln", 8), "final_val_acc_mean"]  # fake BN: small
    assert summ.loc[("bn", 8), "steps_mean"] == 320  # 2560 / 8
    assert (out / "batch_size.png").exists()

    cv = run_sweep(make_spec(tmp_path, kind="convergence", study_name="c", tolerance=None,
                             grid={"model.norm": ["bn", "none"], "seed": [0, 1, 2]}, overrides={"optim.lr": 0.1},
                             target={"metric": "val/acc", "value": 0.3}))
    out = write_report("c", storage=cv.storage)
    summ = pd.read_csv(out / "summary.csv").set_index("norm")
    trials = study_trials(cv)
    for norm in ("bn", "none"):
        steps = [t.user_attrs["steps_to_target"] for t in trials if t.user_attrs["config"]["model"]["norm"] == norm]
        reached = [s for s in steps if s is not None]
        assert summ.loc[norm, "n_reached"] == len(reached)
        if reached:
            assert summ.loc[norm, "steps_to_target_mean"] == pytest.approx(sum(reached) / len(reached))
    assert (out / "steps_to_target.png").exists() and (out / "metric_bars.png").exists()

    se = run_sweep(make_spec(tmp_path, kind="search", study_name="s", tolerance=None, grid={"model.norm": ["bn", "ln"]},
                             n_trials=4, search_space={"optim.lr": {"low": 0.01, "high": 1.0, "log": True}}))
    out = write_report("s", storage=se.storage)
    best = pd.read_csv(out / "search_best.csv").set_index("group")
    for g, name in (("norm=bn", "s/norm=bn"), ("norm=ln", "s/norm=ln")):
        st = optuna.load_study(study_name=name, storage=open_storage(se.storage))
        assert best.loc[g, "best_value"] == pytest.approx(st.best_value)
        assert best.loc[g, "optim.lr"] == pytest.approx(st.best_params["optim.lr"])
    assert (out / "search_history.png").exists()


def test_report_before_any_trial_finished(tmp_path):
    from normablate.sweep.runner import Sweep

    sw = Sweep(load_spec(make_spec(tmp_path)), verbose=False)
    sw.setup()  # study created, 18 trials queued, none run
    out = write_report("r", storage=sw.url, out_dir=tmp_path / "rep")
    md = (out / "summary.md").read_text()
    assert "trials counted: 0 of 18" in md and "no finished trials" in md
    assert not list(out.glob("*.png"))


def test_cost_line_sums_what_the_runs_recorded_and_says_what_is_missing():
    from normablate.report import cost_line

    df = pd.DataFrame({"wall_time": [100.0, 300.0, 200.0], "cpu_time": [90.0, None, 3510.0],
                       "cpu": ["EPYC A", "EPYC A", "Xeon B"]})
    assert cost_line(df) == ("3 runs, 0.17 h of run time summed (median 200 s per run); 1.00 CPU-hours summed over "
                             "the 2 runs that recorded it; on EPYC A (2 runs), Xeon B (1 run)")
    old = pd.DataFrame({"wall_time": [3600.0], "cpu_time": [None], "cpu": [None]})  # a trial from before
    assert cost_line(old) == ("1 run, 1.00 h of run time summed (median 3600 s per run); CPU time not recorded "
                              "(runs from before normablate recorded it)")
    assert cost_line(pd.DataFrame()) == "no finished runs"


def test_report_cli(tmp_path, capsys):
    from normablate.cli import main

    res = run_sweep(make_spec(tmp_path, grid={"model.norm": ["bn", "ln"], "optim.lr": [0.1]}))
    assert main(["report", "--study", "r", "--storage", res.storage, "--out", str(tmp_path / "o")]) == 0
    assert "report: " in capsys.readouterr().out and (tmp_path / "o" / "summary.csv").exists()
    assert main(["report", "--study", "zzz", "--storage", res.storage]) == 2


def test_configurations_of_two_axes_with_the_same_values_are_named_apart():
    """A block norm and an FFN norm both 'bn': the report must not call the configuration 'bn bn' (or two different
    ones 'ln None' and 'bn None' without saying which axis is which)."""
    from normablate.analysis.tables import config_label

    assert config_label(["bn"], ["norm"]) == "bn"
    assert config_label(["bn", "bn"], ["norm", "ffn_norm"]) == "norm=bn ffn_norm=bn"
    assert config_label(("ln", None), ("norm", "ffn_norm")) == "norm=ln ffn_norm=None"
    assert config_label(["bn", 0.001], ["norm", "lr"]) == "norm=bn lr=0.001"


def test_an_accuracy_cell_counts_the_runs_at_chance_diverged_ones_included():
    """v1's santurkar table read "0.1 ± 0 [1/3 diverged]" where all three seeds ended at chance: the mean is over the
    two finished runs, and the diverged one (tested as it stopped) ended there too. The cell says so."""
    from normablate.analysis.tables import cell

    def trials(accs, diverged, classes=10):
        return pd.DataFrame({"final_test_acc": accs, "diverged": diverged, "num_classes": [classes] * len(accs),
                             "final_test_loss": [2.3] * len(accs), "state": ["complete"] * len(accs)})

    at_chance = trials([0.1, 0.1, 0.0998], [False, False, True])
    assert cell(at_chance, "final_test_acc")[4] == "0.1 ± 0 [1/3 diverged; 3/3 at chance]"
    assert cell(at_chance, "final_test_loss")[4] == "2.3 ± 0 [1/3 diverged]"  # no accuracy: no chance count
    assert cell(trials([0.1, 0.52, 0.55], [False] * 3), "final_test_acc")[4].endswith("[1/3 at chance]")
    assert "chance" not in cell(trials([0.111, 0.52, 0.55], [False] * 3), "final_test_acc")[4]  # > 1 point above
    assert cell(trials([0.5, 0.55], [False] * 2), "final_test_acc")[4] == "0.525 ± 0.32"
    assert cell(trials([0.1, 0.1], [True, True]), "final_test_acc")[4] == "diverged [2/2 at chance]"
    assert cell(trials([0.4, 0.1], [True, True]), "final_test_acc")[4] == "diverged [1/2 at chance]"
    assert cell(trials([0.3, 0.3], [False] * 2, classes=2), "final_test_acc")[4].endswith("[2/2 at chance]")
    no_classes = trials([0.1, 0.1], [False] * 2).drop(columns="num_classes")
    assert "chance" not in cell(no_classes, "final_test_acc")[4]
    # trials from before runs recorded their classes (v2's santurkar_lr_range): the source's known count, the
    # rule the plots' chance line uses; an unknown source still gives no count
    old = trials([0.1, 0.1, 0.0998], [False, False, True]).assign(num_classes=None, source="../shared/data/cifar10/")
    assert cell(old, "final_test_acc")[4] == "0.1 ± 0 [1/3 diverged; 3/3 at chance]"
    assert "chance" not in cell(old.assign(source="mystery"), "final_test_acc")[4]
    assert cell(old.assign(source="cifar100"), "final_test_acc")[4] == "0.1 ± 0 [1/3 diverged]"  # 0.1 > 1/100 + 0.01
    mixed = old.assign(num_classes=[float("nan"), 10.0, float("nan")])  # a float column, as pd.DataFrame(rows) makes
    assert mixed["num_classes"].dtype == float and cell(mixed, "final_test_acc")[4].endswith("[1/3 diverged; 3/3 at chance]")


def _ppl_lr_plot(tmp_path, monkeypatch, vals: dict[tuple[str, float], list[float]]):
    """The axes of the lr_sensitivity plot of final val/ppl values {(norm, lr): per-seed values}."""
    from normablate.analysis import plots as P

    lm = {"model": {"backbone": "transformer_lm", "norm": "ln", "n_layer": 1, "n_embd": 16, "n_head": 2},
          "data": {"source": "synthetic", "batch_size": 4, "block_size": 16}}
    n_seeds = max(len(v) for v in vals.values())
    spec = load_spec({"kind": "lr_sensitivity", "study_name": "x", "base": lm, "trainer_fn": DRY,
                      "grid": {"optim.lr": sorted({lr for _, lr in vals}), "seed": list(range(n_seeds))},
                      "metric": "val/ppl", "direction": "minimize", "tolerance": 0.02, "tolerance_relative": True})
    rows = [{"norm": n, "lr": lr, "seed": s, "state": "complete", "diverged": False, "final_val_ppl": v}
            for (n, lr), vs in vals.items() for s, v in enumerate(vs)]
    d = StudyData("x", "mem", spec, pd.DataFrame(rows), len(rows))
    kind = studies.get("lr_sensitivity")
    figs = []
    monkeypatch.setattr(P, "save", lambda fig, path: figs.append(fig) or path)
    assert kind.plot(d, kind.table(d), tmp_path) is not None
    return figs[0].axes[0]


def test_perplexity_lr_plot_has_a_log_axis_that_holds_every_mean(tmp_path, monkeypatch):
    """Perplexity is exp(loss): one norm at 22 must not squash the others at 7-9 (lm_norms), so its LR plot reads
    on a log y axis (never below perplexity 1) with every mean inside the axis."""
    vals = {("ln", 0.001): [9.1, 9.0], ("ln", 0.003): [7.2, 7.3], ("dyt", 0.001): [21.8, 22.5],
            ("dyt", 0.003): [29.0, 30.1]}
    ax = _ppl_lr_plot(tmp_path, monkeypatch, vals)
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log" and 1.0 <= lo <= 7.2 and hi >= 29.0
    assert "log scale" in ax.get_ylabel() and "perplexity" in ax.get_ylabel()


def test_single_configuration_lr_plot_shows_its_whole_ci_with_labelled_ticks(tmp_path, monkeypatch):
    """One norm at one LR (an LR check): nothing to squash, so its whole CI is on the axis (it was cut to a
    sliver), and the sub-decade log axis carries at least 3 labelled ticks."""
    from normablate.analysis.stats import mean_ci

    vals = [23.14, 23.24, 23.32]
    ax = _ppl_lr_plot(tmp_path, monkeypatch, {("dyt", 0.0003): vals})
    m, ci, _ = mean_ci(vals)
    lo, hi = ax.get_ylim()
    assert lo <= m - ci and hi >= m + ci
    assert len([t for t in ax.get_yticks() if lo <= t <= hi]) >= 3


def test_loss_curves_keep_the_chance_line_in_view(tmp_path, monkeypatch):
    """A byte LM's curves live at 1.6-4 nats, chance (uniform over 256 bytes) is ln 256 = 5.55: the y range is
    robust to outliers (percentiles) but must still show the chance line it draws (lm_norms' figure did not)."""
    from normablate.analysis import plots as P

    spec = load_spec({"kind": "lr_sensitivity", "study_name": "x", "base": BASE, "trainer_fn": DRY,
                      "grid": {"optim.lr": [0.001], "seed": [0, 1]}})
    rows = [{"norm": "ln", "lr": 0.001, "seed": s, "state": "complete", "diverged": False, "task": "lm",
             "final_val_acc": 0.0} for s in (0, 1)]
    hist = {i: {"train/loss": [[k, 4.0 - 0.02 * k + 0.01 * i] for k in range(100)]} for i in range(2)}
    d = StudyData("x", "mem", spec, pd.DataFrame(rows), 2, histories=hist)
    figs = []
    monkeypatch.setattr(P, "save", lambda fig, path: figs.append(fig) or path)
    assert P.loss_curves(d, tmp_path) is not None
    lo, hi = figs[0].axes[0].get_ylim()
    assert lo <= 2.02 and hi > math.log(256) and hi < 7.0  # chance in view, not an axis from 0 to 10


@pytest.mark.parametrize("lo,hi", [(5.3, 25.5), (7.5, 14.6), (1.0, 9.0), (100.0, 150.0), (5.9, 6.3), (1.0001, 1.002)])
def test_log_ticks_cover_a_sub_decade_perplexity_axis(lo, hi):
    from normablate.analysis.plots import log_ticks
    ticks = log_ticks(lo, hi)
    assert len(ticks) >= 3 and ticks == sorted(set(ticks))
    assert all(lo <= t <= hi for t in ticks)
    # no stretch of the axis is left without a tick: the largest log gap (ends included) is under half the range
    edges = [lo, *ticks, hi]
    assert max(math.log(b / a) for a, b in zip(edges, edges[1:])) < 0.5 * math.log(hi / lo)


def test_interrupted_trials_are_told_apart_from_failed_ones(tmp_path):
    from normablate.report.data import load
    from normablate.sweep.queue import INTERRUPTED

    res = run_sweep(make_spec(tmp_path, grid={"model.norm": ["bn"], "optim.lr": [0.1]}))
    study = optuna.load_study(study_name=res.study_name, storage=open_storage(res.storage))
    for err in (INTERRUPTED, INTERRUPTED, "worker died"):  # two stopped by a signal, one crashed
        t = study.ask()
        t.set_user_attr("error", err)
        study.tell(t, state=TrialState.FAIL)
    notes = load(res.study_name, res.storage).notes
    assert any("2 trial(s) interrupted by a signal" in n and "(not re-run yet)" in n
               for n in notes), notes
    assert any("1 failed trial(s) not counted (crashed" in n for n in notes), notes
    # the re-runs say whether they found their checkpoint (santurkar_lr_range_3x's did not: a worktree made again)
    stopped = [t.number for t in study.get_trials() if t.user_attrs.get("error") == INTERRUPTED]
    for number, resumed in zip(stopped, (True, False)):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"resumed": resumed},
                                                  system_attrs={"nb:retry_of": [number]}))
    notes = load(res.study_name, res.storage).notes
    assert any("2 trial(s) interrupted by a signal (a stopped sweep), each re-queued; of the re-runs, 1 continued from "
               "its checkpoint and 1 trained again from step 0 (no checkpoint in its folder)" in n for n in notes), notes
    # a re-run of a re-run (its nb:retry_of is the whole chain) is not counted again for the first interrupted trial
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"resumed": True},
                                              system_attrs={"nb:retry_of": [stopped[0], 99]}))
    notes = load(res.study_name, res.storage).notes
    assert any("of the re-runs, 1 continued from its checkpoint and 1 trained again" in n for n in notes), notes
