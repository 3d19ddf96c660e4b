"""End-to-end training runs: learning, TensorBoard scalars, determinism, resume, divergence, configs, errors."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from normablate.cli import main
from normablate.config import load_config
from normablate.errors import ConfigError
from normablate.result import RunResult
from normablate.train import train
from support.procs import run_bounded, signal_once_exists

ROOT = Path(__file__).resolve().parents[1]

TINY_IMAGE = [
    "model.backbone=resnet20", "model.width=8", "data.source=synthetic", "data.batch_size=64",
    "data.train_limit=4096", "data.val_limit=500", "data.val_batch_size=250", "data.augment=false",
    "optim.name=adamw", "optim.lr=3e-3", "optim.weight_decay=0.05", "optim.warmup_steps=5",
    "trainer.max_steps=60", "trainer.val_every=30", "trainer.progress=false",
]
TINY_LM = [
    "model.backbone=transformer_lm", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
    "data.source=synthetic", "data.mode=samples", "data.block_size=64", "data.batch_size=16",
    "data.val_batch_size=32", "optim.name=adamw", "optim.lr=3e-3", "optim.weight_decay=0.1",
    "optim.warmup_steps=5", "trainer.max_steps=40", "trainer.val_every=20", "trainer.val_batches=4",
    "trainer.progress=false",
]


def cfg_for(tmp_path, base, *extra):
    return load_config(None, [*base, f"trainer.log_dir={tmp_path}", "experiment=t", *extra])


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_image_run_learns_and_logs(tmp_path):
    result = train(cfg_for(tmp_path, TINY_IMAGE, "model.norm=bn"))
    assert result.status == "completed" and result.steps == 60
    # chance is 0.1 (+-0.013 at 500 samples): 0.15 is ~4 standard errors above it (held-out validation images)
    assert result.final["val/acc"] > 0.15, result.final
    assert result.test["test/acc"] > 0.15, result.test  # the test split, evaluated once at the end
    tags = scalars(Path(result.run_dir))
    for tag in ("train/loss", "val/loss", "val/acc", "lr", "grad_norm", "throughput",
                "val/loss_batchstats", "val/train_eval_gap"):
        assert tag in tags, f"{tag} missing from TensorBoard events: {sorted(tags)}"
    assert len(tags["val/acc"]) == 2  # steps 30 and 60
    run_dir = Path(result.run_dir)
    assert (run_dir / "config.yaml").exists() and (run_dir / "last.ckpt").exists()
    versions = json.loads((run_dir / "versions.json").read_text())
    assert {"torch", "lightning", "timm", "git_commit"} <= set(versions)
    import datasets, optuna, timm, torchmetrics  # read from metadata, not imported: the same versions
    assert [versions[m.__name__] for m in (datasets, optuna, timm, torchmetrics)] == [
        m.__version__ for m in (datasets, optuna, timm, torchmetrics)]
    assert RunResult.load(run_dir / "result.json").final == result.final
    # the HPARAMS session is written with the config keys, beside the final metrics, in <run>/hparams/ (the
    # experiment is built by TensorBoard from all runs: tests/test_loggers.py reads it through TensorBoard's own API)
    acc = EventAccumulator(str(run_dir / "hparams"))
    acc.Reload()
    content = b"".join(acc.PluginTagToContent("hparams").values())
    assert b"optim.lr" in content and b"model.norm" in content and "epoch" not in tags
    assert {"hp/val_acc", "hp/test_acc", "run/diverged"} <= set(acc.Tags()["scalars"])


def test_lm_run_learns(tmp_path):
    result = train(cfg_for(tmp_path, TINY_LM, "model.norm=ln"))
    assert result.status == "completed"
    assert result.final["val/ppl"] < 40, result.final  # uniform over bytes is 256
    tags = scalars(Path(result.run_dir))
    assert {"val/ppl", "val/loss", "train/loss", "lr", "grad_norm", "throughput"} <= set(tags)
    assert "hp/val_ppl" in scalars(Path(result.run_dir) / "hparams")


def test_no_batchstat_gap_without_bn(tmp_path):
    result = train(cfg_for(tmp_path, TINY_IMAGE, "model.norm=ln", "trainer.max_steps=4", "trainer.val_every=4"))
    assert "val/train_eval_gap" not in result.final and "val/loss" in result.final


def test_real_cifar10_run(tmp_path, shared_data):
    result = train(cfg_for(tmp_path, TINY_IMAGE, f"data.source={shared_data / 'cifar10'}", "data.train_limit=5000",
                           "data.val_limit=1000", "trainer.max_steps=60", "trainer.val_every=60"))
    assert result.final["val/acc"] > 0.2, result.final  # chance is 0.1 (+-0.01 at 1000 samples)


def test_real_tinyshakespeare_run(tmp_path, shared_data):
    result = train(cfg_for(tmp_path, TINY_LM, f"data.source={shared_data / 'tinyshakespeare' / 'input.txt'}",
                           "data.mode=blocks", "model.norm=ln"))
    assert result.final["val/ppl"] < 40, result.final


def test_deterministic(tmp_path):
    a = train(cfg_for(tmp_path, TINY_IMAGE, "run=a", "trainer.max_steps=10", "trainer.val_every=5",
                      "model.norm=noisy_bn"))
    b = train(cfg_for(tmp_path, TINY_IMAGE, "run=b", "trainer.max_steps=10", "trainer.val_every=5",
                      "model.norm=noisy_bn"))
    assert a.final == b.final
    assert a.history["train/loss"] == b.history["train/loss"]


class _InterruptAt(L.Callback):
    """Simulates Ctrl-C arriving during step ``step`` (the same path a real SIGINT takes)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            monitor = next(c for c in trainer.callbacks if type(c).__name__ == "RunMonitor")
            monitor.stop_request.signum = signal.SIGINT


@pytest.mark.parametrize("norm,base,cut_at", [("noisy_bn", TINY_IMAGE, 13), ("masked_bn", TINY_LM, 13),
                                               ("noisy_bn", TINY_IMAGE, 16), ("masked_bn", TINY_LM, 24)])
def test_resume_equals_uninterrupted(tmp_path, norm, base, cut_at):
    """Interrupted between validations (13), on a validation step (16) or on the last step (24)."""
    steps = ["trainer.max_steps=24", "trainer.val_every=8", f"model.norm={norm}", "model.dropout=0.1"
             if base is TINY_LM else "data.augment=true"]
    full = train(cfg_for(tmp_path, base, "run=full", *steps))
    cut = train(cfg_for(tmp_path, base, "run=cut", *steps), callbacks=[_InterruptAt(cut_at)])
    if cut_at == 24:  # a request on the last step lets the run finish
        assert cut.status == "completed" and cut.final == full.final
        return
    assert cut.status == "interrupted" and cut.steps == cut_at
    assert not (Path(cut.run_dir) / "result.json").exists()
    resumed = train(cfg_for(tmp_path, base, "run=cut", *steps), resume=True)
    assert resumed.status == "completed" and resumed.steps == 24
    assert "val/train_eval_gap" in resumed.final  # BN family: running-stat vs batch-stat validation
    assert resumed.final == full.final
    for key in full.history:  # every curve, validations included, step for step
        assert resumed.history[key] == full.history[key], key
    # a finished run is not repeated
    again = train(cfg_for(tmp_path, base, "run=cut", *steps), resume=True)
    assert again.wall_time == resumed.wall_time


def test_cpu_time_is_recorded_and_summed_over_resumes(tmp_path):
    """CPU seconds of the run, carried in the checkpoint across an interruption; unknown (None) for a run resumed
    from a checkpoint that did not record them, never a silent undercount."""
    import torch

    steps = ["trainer.max_steps=12", "trainer.val_every=4", "model.norm=bn"]
    cut = train(cfg_for(tmp_path, TINY_IMAGE, "run=cut", *steps), callbacks=[_InterruptAt(6)])
    ckpt = Path(cut.run_dir) / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("RunMonitor")]
    saved = state["callbacks"][key]["cpu_time"]
    assert 0 < saved <= cut.cpu_time
    resumed = train(cfg_for(tmp_path, TINY_IMAGE, "run=cut", *steps), resume=True)
    assert resumed.status == "completed" and resumed.cpu_time > saved  # the first part's CPU counted, and more
    assert resumed.versions["cpu"] and int(resumed.versions["cpus"]) >= 1
    assert json.loads((Path(resumed.run_dir) / "versions.json").read_text()) == resumed.versions
    assert RunResult.load(Path(resumed.run_dir) / "result.json").cpu_time == resumed.cpu_time

    old = train(cfg_for(tmp_path, TINY_IMAGE, "run=old", *steps), callbacks=[_InterruptAt(6)])
    ckpt = Path(old.run_dir) / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    del state["callbacks"][key]["cpu_time"]  # as written by a version that did not record it
    torch.save(state, ckpt)
    resumed_old = train(cfg_for(tmp_path, TINY_IMAGE, "run=old", *steps), resume=True)
    assert resumed_old.status == "completed" and resumed_old.cpu_time is None


class _SigtermDuringValidation(L.Callback):
    """A real SIGTERM delivered to this process while validation runs (Lightning's own handler would raise)."""

    def __init__(self):
        self.sent = False

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_stops_after_it(tmp_path):
    steps = ["trainer.max_steps=12", "trainer.val_every=4", "model.norm=bn"]
    before = signal.getsignal(signal.SIGTERM)
    full = train(cfg_for(tmp_path, TINY_IMAGE, "run=full", *steps))
    cut = train(cfg_for(tmp_path, TINY_IMAGE, "run=cut", *steps), callbacks=[_SigtermDuringValidation()])
    assert cut.status == "interrupted" and cut.steps == 4  # validation at step 4 finished and checkpointed
    assert [s for s, _ in cut.history["val/acc"]] == [4]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored after the run
    resumed = train(cfg_for(tmp_path, TINY_IMAGE, "run=cut", *steps), resume=True)
    assert resumed.final == full.final and resumed.history == full.history


def test_a_stop_requested_before_the_run_started_is_not_lost(tmp_path):
    """A sweep worker signalled while it sets its next trial up (its stop flag set, the run's own handler not yet
    installed) stops that run at its first step boundary, checkpointed, instead of after the whole run."""
    from normablate.signals import STOP, stop_on_signals

    with stop_on_signals(STOP):
        STOP.signum = signal.SIGTERM
        try:
            cut = train(cfg_for(tmp_path, TINY_IMAGE, "run=cut", "trainer.max_steps=12", "trainer.val_every=4"))
        finally:
            STOP.signum = None
    assert cut.status == "interrupted" and cut.steps == 1
    assert any(tmp_path.rglob("cut/last.ckpt"))


class _SigtermDuringTest(L.Callback):
    """A real SIGTERM while the test split is evaluated, after the last step boundary."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_requested_after_the_last_step_reaches_the_sweep_worker(tmp_path):
    """A sweep worker's run signalled during its test (nothing left to checkpoint) completes and is recorded, and the
    worker's flag is set when it returns, so the worker claims no next trial (the signal used to be lost there)."""
    from normablate.signals import STOP, stop_on_signals

    STOP.signum = None
    try:
        with stop_on_signals(STOP):
            done = train(cfg_for(tmp_path, TINY_IMAGE, "run=late", "trainer.max_steps=4", "trainer.val_every=4"),
                         callbacks=[_SigtermDuringTest()])
            assert done.status == "completed" and done.steps == 4 and done.test
            assert STOP.signum == signal.SIGTERM
    finally:
        STOP.signum = None


def test_a_signal_while_lightning_sets_up_the_training_loop_stops_at_a_step_boundary(tmp_path, monkeypatch):
    """A SIGTERM after Lightning installed its handlers but before ours replace them (the train loader is being
    built) stops the run at its first step boundary with a checkpoint, also when that step validates (Lightning's
    flag, left set, used to raise SIGTERMException mid-validation, with no checkpoint)."""
    from normablate.data.common import StepDataModule

    built = StepDataModule.train_dataloader

    def signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return built(self)

    monkeypatch.setattr(StepDataModule, "train_dataloader", signalled)
    cut = train(cfg_for(tmp_path, TINY_IMAGE, "run=early", "trainer.max_steps=4", "trainer.val_every=1"))
    assert cut.status == "interrupted" and cut.steps == 1 and [s for s, _ in cut.history["val/acc"]] == [1]
    assert any(tmp_path.rglob("early/last.ckpt"))


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = cfg_for(tmp_path, TINY_IMAGE, "run=x", "trainer.max_steps=2", "trainer.val_every=2")
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg)


def test_divergence_is_a_result(tmp_path, capsys):
    code = main(["train", *TINY_IMAGE, f"trainer.log_dir={tmp_path}", "model.norm=none", "optim.name=sgd",
                 "optim.lr=1e4", "optim.warmup_steps=0", "trainer.max_steps=30"])
    assert code == 0
    out = capsys.readouterr().out
    assert "status   diverged at step" in out
    result = RunResult.load(next(tmp_path.rglob("result.json")))
    assert result.diverged and result.diverged_step is not None and result.diverged_step < 30


@pytest.mark.slow
def test_sigint_checkpoint_then_resume_cli(tmp_path):
    """A real Ctrl-C: the CLI saves a checkpoint, exits 130; --resume finishes the run."""
    args = [sys.executable, "-m", "normablate.cli", "train", *TINY_IMAGE, f"trainer.log_dir={tmp_path}",
            "experiment=t", "run=sig", "trainer.max_steps=120", "trainer.val_every=10"]
    code, out = signal_once_exists(args, tmp_path / "t" / "sig" / "last.ckpt", signal.SIGINT, tmp_path / "out.log",
                                   cwd=ROOT)
    assert code == 130, out[-3000:]
    assert "interrupted" in out and not (tmp_path / "t" / "sig" / "result.json").exists()
    done = run_bounded([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = RunResult.load(tmp_path / "t" / "sig" / "result.json")
    assert result.status == "completed" and result.steps == 120
    assert [s for s, _ in result.history["val/acc"]] == list(range(10, 121, 10))


@pytest.mark.slow  # every shipped config for a few steps: ~3 minutes on the loaded 2-core machine
def test_every_shipped_run_config_runs(tmp_path, shared_data):
    configs = sorted((ROOT / "configs" / "runs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        source = cfg.data.source
        if source == "cifar10":
            source = str(shared_data / "cifar10")  # the hub is unreachable here
        elif source.startswith("../shared/data"):
            source = str(shared_data / source.removeprefix("../shared/data/"))
        over = [f"data.source={source}", f"trainer.log_dir={tmp_path}", "trainer.max_steps=2",
                "trainer.val_every=2", "trainer.val_batches=1", "data.train_limit=256", "data.val_limit=64",
                "data.val_batch_size=32", "data.batch_size=8", "trainer.progress=false", "trainer.accelerator=cpu"]
        result = train(load_config(path, over))
        assert result.status == "completed", path.name
        assert result.steps == 2


# ------------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=0.1"], r"unknown config key 'optim.lrr'.*did you mean optim.lr"),
    (["optim.lr=fast"], r"optim.lr='fast' has the wrong type; expected float"),
    (["optim.lr=-1"], r"optim.lr=-1.0 must be > 0"),
    (["optim.name=adamx"], r"optim.name='adamx' is not allowed; valid: sgd, adam, adamw, lion \(did you mean"),
    (["model.norm=batchnorm"], r"unknown norm 'batchnorm'; valid: batch_renorm, bn, dyt, gn, ln"),
    (["model.backbone=resnet21"], r"unknown backbone 'resnet21'.*did you mean 'resnet20'"),
    (["model.widht=2"], r"backbone 'resnet20' has no option 'widht'.*did you mean 'width'"),
    (["model.norm={name: ln, momentum: 0.1}"], r"norm 'ln' got unknown option\(s\) momentum"),
    (["data.mode=lines"], r"data.mode='lines' is not allowed; valid: blocks, samples"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0 must be >= 1"),
    (["sed=1"], r"unknown config key 'sed'.*did you mean 'seed'"),
    (["task=lm"], r"task='lm' does not fit backbone 'resnet20'; use task='classification'"),
    (["trainer.target_metric=val/ppl", "trainer.target_value=3"], r"target_metric='val/ppl' is not allowed"),
    (["optim.lr"], r"override 'optim.lr' is not of the form key=value"),
])
def test_bad_config_message_and_exit_code(tmp_path, capsys, overrides, message):
    import re

    code = main(["train", f"trainer.log_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_bad_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["train", "--config", str(ROOT / "configs/runs/vit_cifar10.yaml"), "model.norm=ln",
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "norm: ln" in out and "ffn_norm: bn" in out and "max_steps: 20000" in out
