"""normablate.analysis.verdicts: the best-LR rule on a table of runs (shared by the lr_sensitivity report and
scripts/findings_numbers.py) and Holm across a document's hypotheses."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from normablate.analysis.verdicts import best_index, best_lr, best_lr_runs, holm, holm_pairs


def runs(rows):
    return pd.DataFrame(rows, columns=["norm", "lr", "seed", "acc", "diverged"])


def test_best_lr_skips_an_lr_where_a_seed_diverged_and_breaks_ties_low():
    df = runs([("bn", 0.1, 0, 0.80, False), ("bn", 0.1, 1, 0.70, False),   # mean 0.75
               ("bn", 0.3, 0, 0.95, False), ("bn", 0.3, 1, 0.90, True),    # best mean, but a seed diverged
               ("bn", 0.03, 0, 0.75, False), ("bn", 0.03, 1, 0.75, False)])  # ties 0.1: the lower LR wins
    assert best_lr(df, "acc", "maximize") == 0.03
    assert best_lr(df.drop(columns="diverged"), "acc", "maximize") == pytest.approx(0.3)  # no column: all count
    assert best_lr(df, "acc", "minimize") == 0.03
    assert best_lr(df[df["lr"] == 0.3], "acc", "maximize") is None  # no candidate


def test_best_lr_is_best_index_on_the_per_lr_means():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = [("x", lr, s, float(rng.normal()), bool(rng.random() < 0.1)) for lr in (0.01, 0.1, 1.0)
                for s in range(3)]
        df = runs(rows)
        lrs = sorted(df["lr"].unique())
        means = np.array([df[df["lr"] == x]["acc"].mean() for x in lrs])
        cand = np.array([not df[df["lr"] == x]["diverged"].any() for x in lrs])
        i, none = best_index(means, cand, "maximize")
        assert best_lr(df, "acc", "maximize") == (None if none else lrs[int(i)])


def test_best_lr_runs_gives_each_variant_its_own_lr_in_table_order():
    df = runs([("ln", 0.1, 0, 0.6, False), ("ln", 1.0, 0, 0.7, False),
               ("bn", 0.1, 0, 0.9, False), ("bn", 1.0, 0, 0.95, True),
               ("none", 1.0, 0, 0.5, True)])
    best = best_lr_runs(df, ["norm"], "acc", "maximize")
    assert list(best) == [("ln",), ("bn",)]  # 'none' diverged at its only LR: left out
    assert best[("ln",)]["lr"].tolist() == [1.0] and best[("bn",)]["lr"].tolist() == [0.1]


def test_holm_pairs_keeps_names_and_order():
    pairs = [("h1", 0.01), ("h2", 0.04), ("h3", 0.03), ("h4", math.nan)]
    out = holm_pairs(pairs)
    assert [h for h, _, _ in out] == ["h1", "h2", "h3", "h4"]
    assert [p for _, p, _ in out][:3] == [0.01, 0.04, 0.03]
    assert [a for _, _, a in out] == holm([p for _, p in pairs])
    assert [a for _, _, a in out][:3] == pytest.approx([0.04, 0.09, 0.09])  # 4 x 0.01; 3 x 0.03; 2 x 0.04 < 0.09
    with pytest.raises(ValueError, match="h1"):
        holm_pairs([("h1", 0.1), ("h1", 0.2)])
