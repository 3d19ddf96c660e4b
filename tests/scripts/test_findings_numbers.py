"""scripts/findings_numbers.py: the committed cross-study numbers are what the script makes of the committed CSVs,
and its difference-of-differences interval is Welch-Satterthwaite's."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from normablate.analysis.stats import t_quantile

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "findings_numbers.py"


@pytest.fixture(scope="module")
def fn(load_script):
    return load_script("findings_numbers")


def test_committed_cross_study_numbers_are_the_scripts_output():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    committed = (ROOT / "docs" / "findings" / "cross_study.md").read_text()
    assert out == committed, "docs/findings/cross_study.md is stale: python scripts/findings_numbers.py > it"


def test_difference_of_differences_interval(fn):
    # four groups of 3 with sample variance 1 each: d = (2 - 1) - (1 - 1) = 1, se^2 = 4 * 1/3,
    # Welch-Satterthwaite df = (4/3)^2 / (4 * (1/3)^2 / 2) = 8
    hi, lo, hi2, lo2 = (pd.Series(v) for v in ([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]))
    h = t_quantile(0.975, 8) * math.sqrt(4 / 3)
    assert fn.drop_ci(hi, lo, hi2, lo2).startswith(f"+1 [95% CI {1 - h:+.3g}, {1 + h:+.3g}]")
    assert "CI covers 0" in fn.drop_ci(hi, lo, hi2, lo2)
    assert "too few runs" in fn.drop_ci(hi[:1], lo, hi2, lo2)


def test_batch_size_effects_sign_and_clear_verdict(fn, capsys):
    """BN that loses 0.1 at the small batch while GN does not: BN's accuracy drop minus GN's is +0.1, clear."""
    rows = [{"norm": n, "batch_size": b, "seed": s, "train_loss_auc": 1.0 + 0.01 * s,
             "final_val_acc": 0.6 + 0.005 * s - (0.1 if n == "bn" and b == 8 else 0.0)}
            for n in ("bn", "gn") for b in (8, 128) for s in range(3)]
    fn.batch_size_effects(pd.DataFrame(rows), "batch_size")
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("- BN's accuracy drop"))
    assert "minus gn's: +0.1 [95% CI" in line and "(clear)" in line
    assert "- batch 8: gn - bn +0.1" in out and "- batch 128: gn - bn +0 " in out


def test_drops_by_batch_compares_each_smaller_batch_with_the_largest(fn, capsys):
    """BN loses 0.1 at batch 2 only; GN nothing anywhere: BN's drop minus GN's is clear at 2, +0 at 8."""
    rows = [{"norm": n, "batch_size": b, "seed": s, "train_loss_auc": 1.0 + 0.01 * s,
             "final_val_acc": 0.6 + 0.005 * s - (0.1 if n == "bn" and b == 2 else 0.0)}
            for n in ("bn", "gn") for b in (2, 8, 128) for s in range(3)]
    fn.drops_by_batch(pd.DataFrame(rows), "batch_size")
    out = capsys.readouterr().out.splitlines()
    i2 = out.index(next(l for l in out if l.startswith("- accuracy, batch 128 - batch 2: bn +0.1 ")))
    assert out[i2 + 1].startswith("  - BN's drop minus gn's: +0.1 [95% CI") and "(clear)" in out[i2 + 1]
    i8 = out.index(next(l for l in out if l.startswith("- accuracy, batch 128 - batch 8: bn +0 ")))
    assert out[i8 + 1].startswith("  - BN's drop minus gn's: +0 ") and i2 < i8
    assert out[i2 + 2].startswith("  - training-loss AUC, batch 2 - batch 128: bn +0 ")
    assert out[i2 + 3].startswith("  - training-loss AUC at batch 2: gn - bn +0 ")


def test_gn_lr_check_picks_gn_best_lr_without_divergence(fn, capsys):
    """GN at three LRs against BN at one; the LR with the best survivors but a diverged seed is not GN's best."""
    def runs(norm, lr, accs, div=(False, False, False)):
        return [{"norm": norm, "batch_size": 2, "lr_used": lr, "seed": s, "final_val_acc": a, "diverged": d}
                for s, (a, d) in enumerate(zip(accs, div))]
    tiny = pd.DataFrame(runs("bn", 0.00046875, [0.62, 0.61, 0.60]) + runs("gn", 0.00046875, [0.58, 0.59, 0.60]))
    gn_lrs = pd.DataFrame(runs("gn", 0.00015625, [0.63, 0.64, 0.65])
                          + runs("gn", 0.00140625, [0.70, 0.71, 0.10], div=(False, False, True)))
    fn.gn_lr_check(tiny, gn_lrs, "batch_size")
    out = capsys.readouterr().out
    assert "- gn at LR 0.00015625 (base 0.01 at batch 128): final val acc 0.64 " in out
    assert "- gn at LR 0.00140625 (base 0.09 at batch 128): final val acc 0.705 " in out and "1 diverged (left out)" in out
    assert "- gn at its best LR of these (0.00015625) - bn at 0.00046875: +0.03 [95% CI" in out


def test_variant_best_skips_lrs_where_a_seed_diverged(fn):
    """The reports' rule: an LR where any seed diverged is not a candidate, however good its survivors are."""
    rows = [{"norm": "dyt", "lr": lr, "seed": s, "final_val_ppl": ppl, "diverged": div}
            for lr, ppl, divs in ((0.01, 12.0, (False,) * 3), (0.1, 8.0, (False, False, True)))
            for s, div in enumerate(divs)]
    df = pd.DataFrame(rows)
    best = fn.variant_best(df, ["norm"], "final_val_ppl", maximize=False)
    assert best[("dyt",)]["lr"].unique().tolist() == [0.01] and len(best[("dyt",)]) == 3
    # without the diverged column (load() drops those runs) the survivors alone decide
    assert fn.variant_best(df[~df["diverged"]].drop(columns="diverged"), ["norm"], "final_val_ppl",
                           maximize=False)[("dyt",)]["lr"].unique().tolist() == [0.1]
    assert fn.lrs_run(df) == "dyt: 0.01, 0.1 (1/3 diverged)"


def test_batch_size_figure_draws_points_without_a_ci(fn, tmp_path, monkeypatch):
    """A batch size with a single surviving run (no CI) is drawn, inside the axis range, not a crash."""
    monkeypatch.setattr(fn, "FINDINGS", tmp_path)
    linear = pd.DataFrame([{"norm": "bn", "batch_size": b, "seed": s, "final_val_acc": 0.6 + 0.01 * s}
                           for b in (8, 128) for s in range(3)] + [{"norm": "bn", "batch_size": 2, "seed": 0,
                                                                    "final_val_acc": 0.3}])
    fn.batch_size_figure({"linear LR rule": linear, "square-root LR rule": linear[linear["batch_size"] > 2]},
                         "batch_size")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "cross" / "batch_size_rules.png").shape[0] > 100


def test_claim11_says_when_an_arm_has_no_best_lr(fn, capsys, monkeypatch):
    """Affine BN before the ReLU has no finite accuracy at any LR: no best LR is said, not a TypeError."""
    rows = [{"norm": n, "norm_position": pos, "lr": lr, "seed": s, "train_loss_auc": 1.0,
             "final_val_acc": float("nan") if (n, pos) == ("bn", "before_act") else 0.5 + lr}
            for n in ("bn", "bn(affine=False)") for pos in ("before_act", "after_act") for lr in (0.1, 0.5)
            for s in range(2)]
    monkeypatch.setattr(fn, "load", lambda study: pd.DataFrame(rows))
    fn.claim11()
    out = capsys.readouterr().out
    assert "- before_act: no best LR for affine (each LR diverged or has no finite final val acc)" in out
    assert "- after_act, each at its best LR (affine 0.5, no affine 0.5)" in out
