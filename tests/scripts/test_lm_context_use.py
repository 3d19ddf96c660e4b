"""scripts/lm_context_use.py: self-only attention removes every earlier position from a position's output, and
re-evaluating a run's checkpoint gives the run's own logged validation loss."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from normablate import models
from normablate.config import load_config
from normablate.train import train

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "lm_context_use.py"


@pytest.fixture(scope="module")
def cu(load_script):
    return load_script("lm_context_use")


def test_self_only_attention_sees_no_earlier_byte(cu):
    torch.manual_seed(0)
    model = models.create("transformer_lm", norm="ln", n_layer=2, n_embd=32, n_head=4, block_size=16).eval()
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, :6] = torch.randint(0, 256, (6,))  # change every byte before position 6
    with torch.no_grad():
        assert not torch.allclose(model(a)[0, 6:], model(b)[0, 6:])  # as built, earlier bytes matter
        with cu.self_only_attention():
            assert torch.allclose(model(a)[0, 6:], model(b)[0, 6:], atol=1e-6)
        # the patch is undone on exit
        assert not torch.allclose(model(a)[0, 6:], model(b)[0, 6:])


@pytest.mark.parametrize("norm", ["ln", "masked_bn"])
def test_re_evaluation_equals_the_runs_logged_val_loss(cu, tmp_path, norm):
    cfg = load_config(None, [
        "model.backbone=transformer_lm", "model.n_layer=2", "model.n_embd=32", "model.n_head=4",
        f"model.norm={norm}", "data.source=synthetic", "data.mode=samples", "data.block_size=32",
        "data.batch_size=8", "data.val_batch_size=16", "optim.name=adamw", "optim.lr=3e-3",
        "optim.warmup_steps=2", "trainer.max_steps=12", "trainer.val_every=12", "trainer.val_batches=3",
        "trainer.progress=false", f"trainer.log_dir={tmp_path}", "experiment=t"])
    result = train(cfg)
    trials = pd.DataFrame([{"state": "complete", "diverged": False, "run_dir": result.run_dir, "norm": norm,
                            "lr": 3e-3, "seed": 0, "final_val_loss": result.final["val/loss"]}])
    df = cu.measure("t", trials, Path(result.run_dir).parent)
    assert len(df) == 1
    assert df["val_nats"].iloc[0] == pytest.approx(result.final["val/loss"], abs=1e-5)
    assert df["context_gain"].iloc[0] == pytest.approx(df["val_nats_self_only"].iloc[0] - df["val_nats"].iloc[0])
