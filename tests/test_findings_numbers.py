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

ROOT = Path(__file__).resolve().parents[1]
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
