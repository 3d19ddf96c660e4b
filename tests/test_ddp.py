"""Data-parallel runs (Lightning DDP on CPU/gloo): a 2-rank run with synchronized BN equals a 1-process run on the
same global batches step for step; each rank gets its own slice of the global batch; only rank 0 writes."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch

from normablate.config import load_config
from normablate.data import build_datamodule
from normablate.data.common import shard
from normablate.errors import ConfigError
from normablate.result import RunResult
from normablate.train import train
from support.procs import run_bounded, signal_once_exists
from support.runs import COMMON, IMAGE, LM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("base, tol", [(IMAGE, (1e-4, 1e-5)), (LM, (1e-3, 5e-4))], ids=["resnet_bn", "lm_masked_bn"])
def test_two_rank_ddp_equals_one_process(tmp_path, base, tol):
    """Same metrics step for step, to float tolerance. Measured differences: image ~1e-6; LM up to ~1.5e-4 in a
    loss (summed reductions in another order, AdamW's normalized steps carry the rounding on; not investigated
    further), hence its looser tolerance."""
    rel, abs_ = tol
    args = [*base, *COMMON, f"trainer.log_dir={tmp_path}"]
    proc = run_bounded([sys.executable, "-m", "normablate.cli", "train", *args, "run=ddp", "trainer.devices=2",
                           "trainer.strategy=ddp"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("status   completed") == 1, "only rank 0 prints the summary"
    ddp = RunResult.load(tmp_path / "t" / "ddp" / "result.json")
    one = train(load_config(None, [*args, "run=one"]))
    assert ddp.steps == one.steps == 4
    assert set(ddp.history) == set(one.history) and "val/train_eval_gap_precise" in ddp.history
    loss = max(abs(x) for _, x in one.history["val/loss"])
    for k, v in one.history.items():
        got = ddp.history[k]
        assert [s for s, _ in got] == [s for s, _ in v], k
        # a gap is the difference of two losses, each equal to `rel`: its error is rel x the loss, not x the gap
        tol_abs = max(abs_, rel * loss) if "gap" in k else abs_
        assert [x for _, x in got] == pytest.approx([x for _, x in v], rel=rel, abs=tol_abs), k
    writers = {f.name.split(".")[4] for f in (tmp_path / "t" / "ddp").glob("events.out.tfevents.*")}  # pids
    assert len(writers) == 1, f"rank 0 alone writes TensorBoard files, got writers {writers}"
    assert (tmp_path / "t" / "ddp" / "last.ckpt").exists()


def test_each_rank_gets_its_slice_of_the_global_batch():
    for task, cfg in (("classification", IMAGE), ("lm", LM)):
        c = load_config(None, cfg)
        dm = build_datamodule(c.data, c.task, 0)
        dm.setup()
        spec = dm.train_spec(3)
        parts = [shard(spec, r, 2) for r in range(2)]
        for k, v in spec.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(torch.cat([p[k] for p in parts]), v), (task, k)
                assert len(parts[0][k]) == len(v) // 2
            else:
                assert all(p[k] == v for p in parts)
        assert shard(spec, 0, 1) is spec


@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=15", "trainer.devices=2"], "must be divisible by trainer.devices x trainer.num_nodes = 2"),
    (["trainer.strategy=ddp_spawn"], "trainer.strategy='ddp_spawn' is not allowed; valid: auto, ddp"),
    (["trainer.devices=0"], "trainer.devices=0 must be >= 1"),
    (["trainer.precise_bn=-1"], "trainer.precise_bn=-1 must be >= 0"),
])
def test_ddp_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [*IMAGE, *overrides])


def test_sync_batchnorm_refuses_a_layer_that_cannot_sync(tmp_path):
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm: layer .* cannot be synchronized"):
        train(load_config(None, [*IMAGE, "model.norm=torch.nn:BatchNorm2d", "trainer.sync_batchnorm=true",
                                 "trainer.max_steps=1", f"trainer.log_dir={tmp_path}"]))


@pytest.mark.slow
def test_sigterm_to_rank0_stops_both_ranks_and_resume_finishes(tmp_path):
    """SIGTERM reaching rank 0 only: the flag is reduced over ranks, both stop at the same step boundary after a
    checkpoint (exit 130), and --resume (DDP again) completes the run with every validation recorded once."""
    args = [sys.executable, "-m", "normablate.cli", "train", *IMAGE, "trainer.max_steps=60", "trainer.val_every=5",
            "trainer.progress=false", "trainer.sync_batchnorm=true", "trainer.devices=2", "experiment=t", "run=sig",
            f"trainer.log_dir={tmp_path}"]
    code, out = signal_once_exists(args, tmp_path / "t" / "sig" / "last.ckpt", signal.SIGTERM, tmp_path / "out.log",
                                   cwd=ROOT)
    assert code == 130, out[-3000:]
    assert not (tmp_path / "t" / "sig" / "result.json").exists()
    done = run_bounded([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = RunResult.load(tmp_path / "t" / "sig" / "result.json")
    assert result.status == "completed" and result.steps == 60
    assert [s for s, _ in result.history["val/acc"]] == list(range(5, 61, 5))
