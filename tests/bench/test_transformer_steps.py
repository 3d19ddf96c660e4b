"""The bench section ``transformer_steps`` (issue 29): old vs new Transformer steps, GFLOP/s against a matmul peak
and the profile's bound, at tiny sizes; ``old_path`` swaps in the replaced code and puts the fast paths back."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
from timm.models.vision_transformer import Attention as TimmAttention  # noqa: E402

from normablate.bench.sections import transformer_steps as ts  # noqa: E402
from normablate.bench.settings import Settings  # noqa: E402
from normablate.models import _vit_block, lm  # noqa: E402


def test_old_path_swaps_in_the_replaced_code_and_restores_it():
    fast = _vit_block.Attention.forward
    allowed = torch.tensor([[True, False]])
    with ts.old_path():
        assert _vit_block.Attention.forward is TimmAttention.forward
        assert lm.additive_mask(allowed, torch.float32) is allowed  # the boolean mask, as before
    assert _vit_block.Attention.forward is fast
    assert lm.additive_mask(allowed, torch.float32).dtype == torch.float32


def test_section_rows_at_tiny_sizes():
    rows = ts.run(Settings.make(tiny=True))
    assert [(r.name, r.variant) for r in rows] == [(f"{m} {n}", v) for m in ts.CASES for n in ts.NORMS
                                                   for v in ("fast path", "GFLOP/s", "profile")]
    for r in rows:
        if r.variant == "fast path":
            assert r.ours_value > 0 and r.reference_value > 0 and r.ratio > 0
        elif r.variant == "GFLOP/s":
            assert r.reference_value > 0 and r.ratio == pytest.approx(r.reference_value / r.ours_value)
            assert "of the matmul peak" in r.note
        else:
            assert "matmul" in r.note and "attention" in r.note and "would reach" in r.note
