"""Verdicts: the three test types on synthetic trial data with known answers, Holm, the selection-aware bootstrap's
coverage by simulation, spec validation of ``hypotheses:``, and the freeze of hypotheses in a study."""
from __future__ import annotations

import math
import re
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


def spec_dict(hypotheses, **extra):
    d = {"kind": "lr_sensitivity", "base": BASE, "study_name": "verdicts", "metric": "val/acc",
         "grid": {"seed": [0, 1, 2, 3, 4, 5], "optim.lr": [0.01, 0.1], "model.norm": ["bn", "none"]},
         "hypotheses": hypotheses}
    d.update(extra)
    return d


def hyp(id="h", type="superiority", at="best_lr", margin=None, a="bn", b="none", metric="test/acc", **kw):
    h = {"id": id, "claim": '"BN beats no normalization" (Santurkar et al. 2018, Fig. 1)', "type": type,
         "contrast": {"a": {"model.norm": a}, "b": {"model.norm": b}, "metric": metric, "at": at}}
    if margin is not None:
        h["margin"] = margin
    h.update(kw)
    return h


def study(spec, means: dict, sd=0.01, val_shift=0.0, diverged=(), seed=0, test=True) -> StudyData:
    """Trials of ``spec``'s grid with test/acc = means[(norm, lr)] + noise (val/acc = the same + val_shift + its
    own noise); ``diverged``: (norm, lr, seed) triples."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in spec.points():
        norm, lr, s = p.values["model.norm"], p.values["optim.lr"], p.values["seed"]
        mu = means[(norm, lr)]
        div = (norm, lr, s) in diverged
        row = {"trial": p.index, "point": p.index, "seed": s, "lr": lr, "norm": norm,
               "state": "complete", "diverged": div,
               "final_val_acc": None if div else mu + val_shift + rng.normal(0, sd)}
        if test:
            row["final_test_acc"] = None if div else mu + rng.normal(0, sd)
        rows.append(row)
    return StudyData("verdicts", "memory", spec, pd.DataFrame(rows), spec.total)


# ------------------------------------------------------------------------------------------ stats
def test_t_cdf_against_tables():
    assert V.t_cdf(2.776, 4) == pytest.approx(0.975, abs=2e-4)
    assert V.t_cdf(-1.812, 10) == pytest.approx(0.05, abs=2e-4)
    assert V.t_ppf(0.95, 10) == pytest.approx(1.812, abs=1e-3)
    assert V.t_ppf(0.05, math.inf) == pytest.approx(-1.6449, abs=1e-4)


def test_holm_hand_worked():
    # sorted: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> 0.06 (monotone)
    assert V.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert V.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert V.holm([0.02, float("nan")]) == pytest.approx([0.04, 1.0])  # NaN counts as 1


def test_verdict_words_use_holm():
    # each alone is supported at 0.05 (p = 0.03), but not after Holm over 2 (adjusted 0.06)
    t = V.Test(0.1, 0.0, 0.2, 0.9, 0.03, 0.97)
    words, adj, _ = V.words([t, t], 0.05)
    assert words == ["inconclusive", "inconclusive"] and adj == pytest.approx([0.06, 0.06])
    words, _, _ = V.words([t], 0.05)
    assert words == ["supported"]


def test_paired_and_welch():
    a = {0: 1.0, 1: 2.0, 2: 3.5}
    b = {0: 0.5, 1: 1.4, 2: 3.1}
    d = V.t_contrast(a, b)
    diffs = np.array([0.5, 0.6, 0.4])
    assert d.paired and d.method == "paired t" and d.df == 2
    assert d.est == pytest.approx(0.5) and d.se == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))
    w = V.t_contrast({0: 1.0, 1: 2.0, 2: 3.5}, {5: 0.5, 6: 1.4, 7: 3.1})  # different seeds: Welch
    assert not w.paired and w.se > d.se
    lo, hi = d.interval(0.95)
    assert lo == pytest.approx(0.5 - 4.303 * d.se, abs=1e-3) and hi == pytest.approx(0.5 + 4.303 * d.se, abs=1e-3)


def test_judge_types_on_a_known_distribution():
    # d ~ 0.1 ± small: superiority supported; vs margin 0.2 contradicted; equivalence with 0.05 contradicted
    d = V.TDist(0.1, 0.01, 10, "t", 11, 11, True)
    assert V.judge(d, "superiority", None, 0.05, "maximize").p < 1e-5
    assert V.judge(d, "superiority", 0.2, 0.05, "maximize").p_counter < 1e-5
    assert V.judge(d, "equivalence", 0.05, 0.05, "maximize").p_counter < 1e-3
    assert V.judge(d, "equivalence", 0.3, 0.05, "maximize").p < 1e-5
    # a loss: lower is better, so A − B = +0.1 means A is worse
    t = V.judge(d, "superiority", None, 0.05, "minimize")
    assert t.p > 0.99 and t.p_counter < 1e-5 and t.estimate == pytest.approx(0.1)
    assert V.judge(d, "non_inferiority", 0.05, 0.05, "minimize").p_counter < 1e-3  # worse by more than 0.05
    # the interval is the (1 - 2 alpha) one
    t = V.judge(d, "equivalence", 0.3, 0.05, "maximize")
    assert t.level == pytest.approx(0.9) and t.hi - t.lo == pytest.approx(2 * V.t_ppf(0.95, 10) * 0.01)


# ------------------------------------------------------------------------------------------ on trial data
def test_equivalence_that_holds_by_construction():
    spec = load_spec(spec_dict([hyp("eq", "equivalence", at={"fixed": {"optim.lr": 0.1}}, margin=0.05)]))
    data = study(spec, {("bn", 0.01): 0.5, ("bn", 0.1): 0.7, ("none", 0.01): 0.5, ("none", 0.1): 0.7}, sd=0.005)
    (v,) = V.evaluate(data)
    assert v.word == "supported" and v.split == "test" and v.test.method == "paired t"
    assert -0.05 < v.test.lo < v.test.hi < 0.05 and v.test.n_a == 6


def test_a_diverged_seed_drops_from_its_pair_and_is_counted():
    spec = load_spec(spec_dict([hyp("f", at={"fixed": {"optim.lr": 0.1}})]))
    data = study(spec, {("bn", 0.01): 0.5, ("bn", 0.1): 0.8, ("none", 0.01): 0.5, ("none", 0.1): 0.7}, sd=0.005,
                 diverged={("none", 0.1, 2)})
    (v,) = V.evaluate(data)
    assert v.test.method == "paired t" and (v.test.n_a, v.test.n_b) == (5, 5) and v.word == "supported"
    assert "diverged runs left out (A 0, B 1)" in v.notes


def test_diverged_runs_with_a_test_value_count_at_a_fixed_configuration():
    """train() tests a diverged run as it stopped: at a fixed LR, failing to train is the outcome measured, so those
    runs count (B at chance in every seed: A is clearly better); without test columns (old trials) they stay out."""
    spec = load_spec(spec_dict([hyp("f", at={"fixed": {"optim.lr": 0.1}})]))
    means = {("bn", 0.01): 0.5, ("bn", 0.1): 0.6, ("none", 0.01): 0.5, ("none", 0.1): 0.6}
    seeds = spec_dict([])["grid"]["seed"]
    every = {("none", 0.1, s) for s in seeds}
    data = study(spec, means, sd=0.005, diverged=every)
    rows = (data.trials["norm"] == "none") & (data.trials["lr"] == 0.1)
    data.trials.loc[rows, "final_test_acc"] = 0.1
    (v,) = V.evaluate(data)
    assert (v.test.n_a, v.test.n_b) == (len(seeds), len(seeds)) and v.word == "supported"
    assert v.test.estimate == pytest.approx(0.6 - 0.1, abs=0.01)
    assert not any("left out" in n for n in v.notes) and any("diverged runs counted" in n for n in v.notes)
    (old,) = V.evaluate(study(spec, means, sd=0.005, diverged=every, test=False))  # validation fallback
    assert old.test.n_b == 0 and old.word == "inconclusive"



def test_a_verdict_read_before_the_study_finished_is_marked_interim():
    """A report or a sweep's closing lines on an unfinished study (a run still going, a worker stopped) say so in
    the word, the line and the notes: a word read early is not the pre-registered verdict (optional stopping)."""
    spec = load_spec(spec_dict([hyp("f", at={"fixed": {"optim.lr": 0.1}})]))
    means = {("bn", 0.01): 0.5, ("bn", 0.1): 0.6, ("none", 0.01): 0.5, ("none", 0.1): 0.4}
    full = study(spec, means, sd=0.005)
    (v,) = V.evaluate(full)
    assert v.word == "supported" and not v.interim and "INTERIM" not in v.line()
    part = study(spec, means, sd=0.005)
    part.trials = part.trials.iloc[:-4]  # 20 of 24 runs
    (w,) = V.evaluate(part)
    assert w.word == "supported" and w.interim == "20/24"
    assert "SUPPORTED (INTERIM: 20/24 runs)" in w.line()
    assert w.notes[0].startswith("interim: 20 of the study's 24 runs had finished")
    assert "**supported** (interim, 20/24 runs)" in V.markdown([w])

def test_equivalence_that_does_not_hold():
    spec = load_spec(spec_dict([hyp("eq", "equivalence", at={"fixed": {"optim.lr": 0.1}}, margin=0.02)]))
    data = study(spec, {("bn", 0.01): 0.5, ("bn", 0.1): 0.8, ("none", 0.01): 0.5, ("none", 0.1): 0.7}, sd=0.005)
    (v,) = V.evaluate(data)
    assert v.word == "contradicted" and v.test.estimate == pytest.approx(0.1, abs=0.02)


def test_superiority_contradicted_at_best_lr_and_holm_across_hypotheses():
    # none beats bn by 0.1 at each one's best LR: "bn better" is contradicted, "none better" supported
    hs = [hyp("bn_better"), hyp("none_better", a="none", b="bn"),
          hyp("bn_noninf", "non_inferiority", margin=0.02)]
    spec = load_spec(spec_dict(hs))
    data = study(spec, {("bn", 0.01): 0.55, ("bn", 0.1): 0.6, ("none", 0.01): 0.7, ("none", 0.1): 0.4})
    vs = V.evaluate(data, samples=2000)
    assert [v.word for v in vs] == ["contradicted", "supported", "contradicted"]
    assert vs[0].test.estimate == pytest.approx(-0.1, abs=0.02)  # at bn's 0.1 and none's 0.01
    assert vs[0].test.method.startswith("selection-aware bootstrap")
    assert [v.p_adj for v in vs] == pytest.approx(V.holm([v.test.p for v in vs]))
    assert vs[1].p_adj >= vs[1].test.p
    assert V.evaluate(data, samples=2000)[0].test.lo == vs[0].test.lo  # deterministic
    assert "(A 0.1, B 0.01; chosen on final val/acc)" in vs[0].what  # the LRs the contrast is at
    assert "A's best LR 0.1 is the grid's highest: its optimum may lie outside the grid" in vs[0].notes


def test_an_inconclusive_verdict_says_what_budget_would_decide_it():
    t = V.Test(0.01, -0.01, 0.03, 0.9, 0.2, 0.8)
    v = V.Verdict("h", "claim", "superiority", None, 0.05, "", "test", t, word="inconclusive")
    assert "half-width is 0.02; if the estimate were the truth, about 4.0x the seeds" in v.seeds_needed()
    v = V.Verdict("h", "claim", "equivalence", 0.05, 0.05, "", "test", V.Test(0.01, -0.04, 0.06, 0.9, 0.2, 0.8),
                  word="inconclusive")
    assert "about 1.6x the seeds" in v.seeds_needed()  # half-width 0.05 vs 0.05 - |0.01| = 0.04: (0.05/0.04)^2
    # outside the margin (|+0.07| > 0.05): more seeds would contradict it, not decide it either way, and the estimate
    # is not "on the boundary": (0.05 / 0.02)^2 x (z 0.975 / z 0.95)^2 = 6.25 x 1.42
    v = V.Verdict("h", "claim", "equivalence", 0.05, 0.05, "", "test", V.Test(0.07, 0.02, 0.12, 0.9, 0.6, 0.4),
                  word="inconclusive")
    assert v.seeds_needed() == ("the estimate lies outside the equivalence margin (±0.05): if it were the truth, "
                                "about 8.9x the seeds would contradict the claim")
    v = V.Verdict("h", "claim", "superiority", None, 0.05, "", "test", V.Test(0.0, -0.02, 0.02, 0.9, 0.5, 0.5),
                  word="inconclusive")
    assert "sits on the claim's boundary (+0)" in v.seeds_needed()  # exactly on it: no number of seeds decides
    v = V.Verdict("h", "claim", "superiority", None, 0.05, "", "test", V.Test(0.03, 0.01, 0.05, 0.9, 0.04, 0.96),
                  word="inconclusive")  # supported alone, not after Holm
    assert "Holm's adjustment" in v.seeds_needed()
    v.word = "supported"
    assert v.seeds_needed() == ""


def test_best_lr_skips_lrs_where_a_seed_diverged_and_falls_back_to_val():
    spec = load_spec(spec_dict([hyp("h")]))
    means = {("bn", 0.01): 0.6, ("bn", 0.1): 0.9, ("none", 0.01): 0.5, ("none", 0.1): 0.3}
    # bn's 0.1 is better, but one seed diverged there: bn's best LR is 0.01 -> contrast 0.6 - 0.5
    data = study(spec, means, diverged={("bn", 0.1, 3)}, sd=0.002)
    (v,) = V.evaluate(data, samples=500)
    assert v.test.estimate == pytest.approx(0.1, abs=0.01) and v.word == "supported"
    old = study(spec, means, test=False, sd=0.002)  # trials from before the test split: val, said so
    (v,) = V.evaluate(old, samples=500)
    assert v.split == "val" and "final val/acc" in v.notes[0] and "on val data" in v.line()
    md = V.markdown([v])
    assert md.startswith("## Verdicts") and "no test-split metrics" in md


def test_a_partial_study_is_inconclusive_not_an_error():
    spec = load_spec(spec_dict([hyp("h"), hyp("f", at={"fixed": {"optim.lr": 0.1}})]))
    data = study(spec, {("bn", 0.01): 0.6, ("bn", 0.1): 0.6, ("none", 0.01): 0.5, ("none", 0.1): 0.5})
    data.trials = data.trials[data.trials["norm"] == "bn"].reset_index(drop=True)  # none has not run yet
    assert [v.word for v in V.evaluate(data, samples=200)] == ["inconclusive", "inconclusive"]
    data.trials = data.trials.iloc[:0]
    assert [v.word for v in V.evaluate(data, samples=200)] == ["inconclusive", "inconclusive"]


def test_selection_uses_validation_not_test():
    """Poisoned test data cannot move the choice: test prefers lr 0.1, validation 0.01 -> 0.01 is used."""
    spec = load_spec(spec_dict([hyp("h")]))
    data = study(spec, {("bn", 0.01): 0.6, ("bn", 0.1): 0.6, ("none", 0.01): 0.5, ("none", 0.1): 0.5}, sd=0.001)
    df = data.trials
    df.loc[(df["norm"] == "bn") & (df["lr"] == 0.1), "final_test_acc"] = 0.99
    df.loc[(df["norm"] == "bn") & (df["lr"] == 0.1), "final_val_acc"] = 0.1
    (v,) = V.evaluate(data, samples=300)
    assert v.test.estimate == pytest.approx(0.1, abs=0.01)


def test_over_an_axis_needs_every_value():
    spec = load_spec(spec_dict([hyp("over", "superiority", at={"over": "optim.lr"})]))
    data = study(spec, {("bn", 0.01): 0.7, ("bn", 0.1): 0.55, ("none", 0.01): 0.5, ("none", 0.1): 0.5}, sd=0.005)
    (v,) = V.evaluate(data)
    assert v.word == "supported" and len(v.details) == 2
    data = study(spec, {("bn", 0.01): 0.7, ("bn", 0.1): 0.5, ("none", 0.01): 0.5, ("none", 0.1): 0.5}, sd=0.005)
    (v,) = V.evaluate(data)
    assert v.word == "inconclusive" and v.test.estimate == pytest.approx(0.0, abs=0.02)  # the worst value shown


def test_best_index_is_lr_sensitivitys_rule():
    means = np.array([[0.5, 0.7, 0.7, 0.9], [0.2, 0.1, 0.3, 0.3]])
    cand = np.array([[True, True, True, False], [True, True, True, True]])
    idx, none = V.best_index(means, cand, "maximize")
    assert idx.tolist() == [1, 2] and not none.any()  # ties: the first (lowest) LR; a diverged LR is no candidate
    idx, _ = V.best_index(means, cand, "minimize")
    assert idx.tolist() == [0, 1]
    _, none = V.best_index(means, np.zeros_like(cand), "maximize")
    assert none.all()


def test_selection_aware_ci_coverage_by_simulation():
    """1,000 simulated studies, 5 seeds, 3 LRs per side with near-tied best LRs, seed effects shared across LRs and
    test noise correlated with validation noise: the nominal 95% interval covers the true contrast (between the
    two sides' population-best LRs) at least 90% of the time."""
    rng = np.random.default_rng(1)
    S, n, L, B = 1000, 5, 3, 1000
    mu_a, mu_b = np.array([0.69, 0.70, 0.695]), np.array([0.50, 0.55, 0.56])
    true = mu_a.max() - mu_b.max()

    def draw(mu):
        seed_effect = rng.normal(0, 0.02, (S, n, 1))
        noise = rng.normal(0, 0.02, (S, n, L))
        val = mu + seed_effect + noise
        test = mu + seed_effect + 0.7 * noise + math.sqrt(1 - 0.49) * rng.normal(0, 0.02, (S, n, L))
        return val, np.zeros((S, n, L), bool), test

    a, b = draw(mu_a), draw(mu_b)
    covered = 0
    for lo in range(0, S, 100):
        sl = slice(lo, lo + 100)
        idx = rng.integers(0, n, (B, n))  # paired: the same seed draws for both sides
        ea, _ = V.select_and_report(a[0][sl], a[1][sl], a[2][sl], np.arange(n)[None], "maximize")
        eb, _ = V.select_and_report(b[0][sl], b[1][sl], b[2][sl], np.arange(n)[None], "maximize")
        sa, _ = V.select_and_report(a[0][sl], a[1][sl], a[2][sl], idx, "maximize")
        sb, _ = V.select_and_report(b[0][sl], b[1][sl], b[2][sl], idx, "maximize")
        for i in range(sa.shape[0]):
            lo_, hi_ = V.BootDist(float(ea[i, 0] - eb[i, 0]), sa[i] - sb[i], n, "", n, n, True).interval(0.95)
            covered += lo_ <= true <= hi_
    assert covered / S >= 0.90, covered / S



@pytest.mark.slow
def test_selection_aware_p_holds_its_level_at_three_seeds_when_the_choice_is_stable():
    """The null size of the best-LR claim p at 3 seeds, where the bootstrap has only 10 distinct resample means
    and its tails cannot reach the t tail: 2,000 simulated studies with no true effect and one LR (a choice that
    never moves, the extreme of a stable best LR) reject at a nominal 5% no more often than 5% plus two Monte
    Carlo standard errors (6.0%). The bootstrap alone rejected 7.0% of these studies; with the floor at the t
    test of the chosen LRs, 4.5%."""
    rng = np.random.default_rng(3)
    S, n = 2000, 3

    def side():
        seed_effect = rng.normal(0, 1, (n, 1))
        val, test = seed_effect + rng.normal(0, 1, (n, 1)), seed_effect + rng.normal(0, 1, (n, 1))
        return V.Side(list(range(n)), [0.1], val, np.zeros((n, 1), bool), test)

    rejected = 0
    for s in range(S):  # claim p <= 0.05 exactly when the 90% interval's lower end is above 0 (the p inverts it)
        rejected += V.selection_bootstrap(side(), side(), "maximize", samples=500, seed=s).interval(0.90)[0] > 0
    assert rejected / S <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / S), rejected / S


def test_the_best_lr_interval_contains_the_t_interval_at_the_chosen_lrs():
    """At 3 seeds and one LR (nothing to choose) the selection-aware interval and p-values are never narrower
    or smaller than the paired t's on the same numbers; the estimate is the same."""
    d = np.array([0.03, 0.032, 0.04])
    a = V.Side([0, 1, 2], [0.1], 0.5 + d[:, None], np.zeros((3, 1), bool), 0.5 + d[:, None])
    b = V.Side([0, 1, 2], [0.1], np.full((3, 1), 0.5), np.zeros((3, 1), bool), np.full((3, 1), 0.5))
    boot = V.judge(V.selection_bootstrap(a, b, "maximize"), "superiority", 0.0, 0.05, "maximize")
    t = V.judge(V.t_contrast(dict(enumerate(0.5 + d)), {i: 0.5 for i in range(3)}, True), "superiority", 0.0,
                0.05, "maximize")
    assert boot.estimate == pytest.approx(t.estimate)
    assert boot.p >= t.p - 1e-12 and boot.p == pytest.approx(0.00399, abs=5e-5)  # scipy: ttest_1samp(d, 0)
    assert boot.lo <= t.lo + 1e-12 and boot.hi >= t.hi - 1e-12
    assert "paired t at the chosen LRs" in boot.method

# ------------------------------------------------------------------------------------------ spec validation
@pytest.mark.parametrize("h,extra,match", [
    (hyp(a="gn"), {}, r"model\.norm.*'gn' matches no grid point"),
    (hyp(a=None) | {"contrast": {"a": {"model.nrom": "bn"}, "b": {"model.norm": "none"}, "at": "best_lr"}}, {},
     r"'model\.nrom' is not a grid axis.*did you mean 'model\.norm'"),
    (hyp(type="equivalence"), {}, r"type equivalence needs a margin"),
    (hyp(type="superior"), {}, r"type='superior'.*did you mean 'superiority'"),
    (hyp(metric="val/acc"), {}, r"metric='val/acc'; valid for task 'classification': test/acc, test/loss"),
    (hyp(at={"fixed": {"optim.lr": 0.5}}), {}, r"optim\.lr=0\.5 matches no grid point"),
    (hyp(at="best"), {}, r"at='best'; valid: best_lr"),
    (hyp(claim="BN"), {}, r"claim must quote the claim"),
    (hyp(alpha=0.7), {}, r"alpha=0\.7 must be a number in \(0, 0\.5\)"),
    (hyp(colour="red"), {}, r"unknown key 'colour'"),
    (hyp(at={"fixed": {"model.norm": "bn"}}) | {"contrast": {"a": {"seed": 0}, "b": {"seed": 1},
                                                            "at": "best_lr"}}, {}, r"cannot fix 'seed'"),
    (hyp(), {"kind": "grid", "grid": {"seed": [0, 1], "model.norm": ["bn", "none"]}},
     r"at=best_lr needs a grid axis 'optim\.lr'"),
    (hyp(at={"over": "model.norm"}), {}, r"a and b cannot also fix it"),
    (hyp(at={"fixed": {"model.norm": "bn"}}), {}, r"at\.fixed fixes 'model\.norm', which a or b already fix"),
    (hyp(), {"grid": {"seed": [0, 1], "optim.lr": [0.01, 0.1], "model.norm": ["bn", "none"],
                      "model.width": [8, 16]}}, r"\.a leaves grid axis 'model\.width' open"),
])
def test_spec_validation_errors_name_the_key(h, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_spec(spec_dict([h], **extra))


def test_spec_validation_across_hypotheses():
    with pytest.raises(ConfigError, match="'h' is used twice"):
        load_spec(spec_dict([hyp("h"), hyp("h")]))
    with pytest.raises(ConfigError, match="same alpha"):
        load_spec(spec_dict([hyp("h1"), hyp("h2", alpha=0.01)]))
    with pytest.raises(ConfigError, match="hypotheses need seeds as replicates"):
        load_spec({"kind": "search", "base": BASE, "study_name": "s", "grid": {"model.norm": ["bn", "none"]},
                   "search_space": {"optim.lr": {"low": 0.001, "high": 0.1, "log": True}}, "n_trials": 2,
                   "hypotheses": [hyp()]})


def test_hypotheses_are_in_the_fingerprint_and_absent_ones_change_nothing():
    plain = {k: v for k, v in spec_dict(None).items() if k != "hypotheses"}
    s0 = load_spec(plain)
    assert "hypotheses" not in s0.to_json() and load_spec(spec_dict(None)).fingerprint() == s0.fingerprint()
    s1, s2 = load_spec(spec_dict([hyp()])), load_spec(spec_dict([hyp(margin=0.01)]))
    assert len({s0.fingerprint(), s1.fingerprint(), s2.fingerprint()}) == 3
    assert s1.hypotheses[0]["contrast"]["at"] == "best_lr" and s1.hypotheses[0]["alpha"] == 0.05


# ------------------------------------------------------------------------------------------ frozen in a study
@pytest.mark.slow
def test_changed_hypothesis_refused_for_an_existing_study(tmp_path):
    from normablate.report import verdict_lines, write_report
    from normablate.sweep.runner import run_sweep

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    d = spec_dict([hyp()], log_dir=str(tmp_path / "logs"), trainer_fn="normablate.sweep.dryrun:train",
                  grid={"seed": [0, 1, 2], "optim.lr": [0.01, 0.1], "model.norm": ["bn", "none"]})
    res = run_sweep(d, storage=storage, verbose=False)
    assert res.complete
    import optuna

    from normablate.sweep.queue import read_meta
    from normablate.sweep.storage import open_storage

    st = open_storage(storage)
    study = optuna.load_study(study_name="verdicts", storage=st)
    assert len(study.user_attrs["normablate"]["hypotheses_hash"]) == 16  # the compact record carries the hash
    assert read_meta(st, study)["spec"]["hypotheses"][0]["id"] == "h"  # the full spec, the hypotheses
    assert run_sweep(d, storage=storage, verbose=False).complete  # the same spec continues
    changed = dict(d, hypotheses=[hyp(margin=0.01)])
    with pytest.raises(ConfigError, match=r"differs in: hypotheses.*a changed hypothesis is a new study"):
        run_sweep(changed, storage=storage, verbose=False)
    more = dict(d, grid=dict(d["grid"], seed=[0, 1, 2, 3]))
    with pytest.raises(ConfigError, match="optional stopping"):
        run_sweep(more, storage=storage, verbose=False)
    out = write_report("verdicts", storage=storage, out_dir=tmp_path / "report")
    md = (out / "summary.md").read_text()
    assert md.index("## Verdicts") < md.index("**Headline:** (exploratory)")
    (line,) = verdict_lines(out)
    assert re.match(r"verdict h: (SUPPORTED|CONTRADICTED|INCONCLUSIVE) \(superiority, alpha 0\.05\): A − B = ", line)


def test_lr_width_ratio_with_seed_bootstrap_ci():
    from normablate import studies
    from normablate.studies.lr_sensitivity import width_ratios

    grid = {"seed": [0, 1, 2, 3], "optim.lr": [0.01, 0.1, 1.0], "model.norm": ["bn", "none"]}
    spec = load_spec(spec_dict(None, grid=grid, tolerance=0.05))
    means = {("bn", 0.01): 0.80, ("bn", 0.1): 0.82, ("bn", 1.0): 0.79,  # bn: all three usable: 2 decades
             ("none", 0.01): 0.60, ("none", 0.1): 0.45, ("none", 1.0): 0.40}  # none: its best LR alone
    data = study(spec, means, sd=0.002, val_shift=0.01)
    table = studies.get("lr_sensitivity").table(data)
    assert table.set_index("norm")["width_decades"].to_dict() == pytest.approx({"bn": 2.0, "none": 0.0})
    (r,) = width_ratios(data, table).to_dict("records")
    assert (r["widest"], r["other"], r["ratio"], r["difference_decades"]) == ("bn", "none", math.inf, 2.0)
    assert r["difference_95ci"] == "[2, 2]" and r["ratio_95ci"] == "[inf, inf]"
    # a seed that diverged at bn's 1.0 cuts bn's range in the resamples that draw it: the CI shows it
    data = study(spec, means, sd=0.002, diverged={("bn", 1.0, 0)})
    (r,) = width_ratios(data, studies.get("lr_sensitivity").table(data)).to_dict("records")
    assert r["difference_decades"] == 1.0 and r["difference_95ci"] == "[1, 2]"


@pytest.mark.slow
def test_main_job_ends_with_its_verdict(tmp_path, capsys):
    """`normablate sweep --config configs/sweeps/quick.yaml` (here with the dry-run trainer): the last line printed is
    the pre-registered hypothesis's verdict, on test data."""
    from normablate.cli import main

    code = main(["sweep", "--config", str(ROOT / "configs/sweeps/quick.yaml"), "--dry-run",
                 f"--storage=sqlite:///{tmp_path / 'o.db'}", f"trainer.log_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out
    last = out.strip().splitlines()[-1]
    assert re.match(r"verdict bn_beats_none: (SUPPORTED|CONTRADICTED|INCONCLUSIVE) \(superiority, alpha 0\.05\): "
                    r"A − B = [-+]\d.* on test data, 90% CI \[", last), last
    assert "headline: (exploratory)" in out


@pytest.mark.slow
def test_error_rates_at_the_boundary_of_each_claim():
    """Simulated studies (6 paired seeds) whose true effect sits exactly on the boundary of the claim: a claim is
    supported (or, for superiority, contradicted) at most ~alpha of the time."""
    rng = np.random.default_rng(3)
    S, n, alpha = 1000, 6, 0.05
    cases = [("superiority", None, 0.0, "p"), ("superiority", None, 0.0, "p_counter"),
             ("non_inferiority", 0.02, -0.02, "p"), ("equivalence", 0.02, 0.02, "p"),
             ("equivalence", 0.02, 0.0, "p")]  # last: TOST when the truth is inside: power, not size
    for kind, margin, truth, which in cases:
        b = rng.normal(0.6, 0.02, (S, n))
        a = b + truth + rng.normal(0, 0.01, (S, n))
        hits = 0
        for i in range(S):
            t = V.judge(V.t_contrast(dict(enumerate(a[i])), dict(enumerate(b[i]))), kind, margin, alpha, "maximize")
            hits += getattr(t, which) <= alpha
        rate = hits / S
        if truth == 0.0 and kind == "equivalence":
            assert rate > 0.5, (kind, rate)  # |truth| well inside the margin: usually supported
        else:
            assert rate <= alpha + 0.02, (kind, which, rate)  # alpha plus ~3 SE of a rate near 0.05 (S = 1000)
            if kind != "equivalence":
                assert rate >= 0.02, (kind, which, rate)  # the test is not vacuous either
