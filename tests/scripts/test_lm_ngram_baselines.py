"""scripts/lm_ngram_baselines.py: the Witten-Bell estimator is a distribution and matches a hand computation,
and the committed reference table is what the script computes on the shared data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "lm_ngram_baselines.py"


@pytest.fixture(scope="module")
def ng(load_script):
    return load_script("lm_ngram_baselines")


def _samples(*texts: bytes) -> list[np.ndarray]:
    return [np.frombuffer(t, dtype=np.uint8) for t in texts]


def test_witten_bell_by_hand(ng):
    a, b = ord("a"), ord("b")
    model = ng.WittenBell(_samples(b"abab"), k=1)
    # order 0 sees the targets b, a, b: c = 3, T = 2; interpolated with the uniform distribution
    p0_b = (2 + 2 / 256) / (3 + 2)
    p0_a = (1 + 2 / 256) / (3 + 2)
    # after "a" the model saw b twice: c(a) = 2, T(a) = 1
    assert model.dist([a])[b] == pytest.approx((2 + p0_b) / 3, abs=1e-12)
    # after "b" it saw a once: c(b) = 1, T(b) = 1
    assert model.dist([b])[a] == pytest.approx((1 + p0_a) / 2, abs=1e-12)
    # no history: order 0 only; an unseen context backs off to order 0
    assert model.dist([])[b] == pytest.approx(p0_b, abs=1e-12)
    assert model.dist([ord("z")])[b] == pytest.approx(p0_b, abs=1e-12)
    # the score counts every target after the first byte, with the context inside the sample
    nll, n = model.nll(_samples(b"ab"))
    assert n == 1 and nll == pytest.approx(-np.log((2 + p0_b) / 3), abs=1e-12)


def test_witten_bell_is_a_distribution(ng):
    rng = np.random.default_rng(0)
    train = [rng.integers(97, 103, size=int(rng.integers(2, 30))).astype(np.uint8) for _ in range(50)]
    for k in (0, 1, 2, 3):
        model = ng.WittenBell(train, k)
        for _ in range(20):
            hist = [int(x) for x in rng.integers(95, 105, size=int(rng.integers(0, 5)))]
            p = model.dist(hist)
            assert p.min() > 0 and p.sum() == pytest.approx(1.0, abs=1e-12)
    # a model cut to a lower order is the model fit at that order (the script fits order 3 once)
    top = ng.WittenBell(train, 3)
    for k in (0, 1, 2):
        assert top.nll(train, order=k)[0] == pytest.approx(ng.WittenBell(train, k).nll(train)[0], rel=1e-12)
    # more context never hurts on the training text itself (a model scored on its own data)
    scores = [ng.WittenBell(train, k).nll(train)[0] for k in (0, 1, 2)]
    assert scores[0] > scores[1] > scores[2]


@pytest.mark.slow
def test_committed_table_is_the_scripts_output(shared_data):
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    committed = (ROOT / "docs" / "findings" / "lm_ngram_baselines.md").read_text()
    assert out == committed, "docs/findings/lm_ngram_baselines.md is stale: python scripts/lm_ngram_baselines.py > it"
