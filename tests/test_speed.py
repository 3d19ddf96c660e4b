"""trainer.channels_last and trainer.compile do not change the math: same outputs and gradients as the default
(within float tolerance); the training step's grad-norm logging is computed only on logged steps."""
from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch

import normablate as nb
from normablate.train import speed_options


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm", nb.norms.available())  # every norm trainer.speed=auto may put in NHWC
def test_channels_last_same_outputs_and_gradients(norm):
    base = nb.models.create("resnet20", norm=norm, num_classes=10, width=4)
    fast = speed_options(copy.deepcopy(base), SimpleNamespace(channels_last=True, compile=False))
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)  # noisy_bn draws its noise from the global RNG: the same draws on both sides
    ya, ga = _fwd_bwd(base, x)
    torch.manual_seed(0)
    yb, gb = _fwd_bwd(fast, x)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("g++") is None, reason="torch.compile on CPU "
                    "needs a C++ compiler")
@pytest.mark.parametrize("backbone,norm", [("transformer_lm", "masked_bn")])  # our autograd.Function too
def test_compile_same_outputs_and_gradients(backbone, norm):
    kw = {"num_classes": 10, "width": 4} if backbone == "resnet20" else \
        {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 32, "block_size": 8}
    base = nb.models.create(backbone, norm=norm, **kw)
    fast = speed_options(copy.deepcopy(base), SimpleNamespace(channels_last=False, compile=True))
    assert fast.state_dict().keys() == base.state_dict().keys()  # checkpoints unchanged
    if backbone == "resnet20":
        args = (torch.randn(4, 3, 16, 16),)
    else:
        mask = torch.ones(3, 8, dtype=torch.bool)
        mask[1, 5:] = False
        args = (torch.randint(0, 32, (3, 8)), mask)

    def run(model):
        model.zero_grad(set_to_none=True)
        y = model(args[0]) if len(args) == 1 else model(args[0], mask=args[1])
        y.float().square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ya, ga = run(base)
    yb, gb = run(fast)
    torch.testing.assert_close(yb, ya, atol=1e-4, rtol=1e-4)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(dict(fast.named_buffers()), dict(base.named_buffers()), atol=1e-5, rtol=1e-5)


def test_speed_options_are_config_keys():
    from normablate.config import load_config

    cfg = load_config(None, ["trainer.channels_last=true", "trainer.compile=false"])
    assert cfg.trainer.channels_last is True and cfg.trainer.compile is False
    with pytest.raises(nb.ConfigError):
        load_config(None, ["trainer.channels_lst=true"])


# ------------------------------------------------------------------------------------------ trainer.speed
TINY_CNN = ["model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=16",
            "data.train_limit=256", "data.val_limit=64", "data.val_batch_size=64", "optim.name=sgd",
            "optim.lr=0.005", "trainer.max_steps=4", "trainer.val_every=2", "trainer.progress=false"]


def _cfg(tmp_path, *extra, base=TINY_CNN):
    from normablate.config import load_config

    return load_config(None, [*base, f"trainer.log_dir={tmp_path}", "experiment=speed", *extra])


def test_auto_equals_eager_and_is_recorded(tmp_path):
    """auto picks channels-last for a CNN on CPU; the run matches the eager one within float tolerance, and the
    choice is in config.yaml, RunResult.config, versions (result and versions.json) and HPARAMS."""
    import json

    import yaml

    from normablate.train import train

    auto = train(_cfg(tmp_path, "model.norm=bn", "run=auto"))
    eager = train(_cfg(tmp_path, "model.norm=bn", "run=eager", "trainer.speed=eager"))
    assert auto.config["trainer"]["channels_last"] is True and auto.config["trainer"]["compile"] is False
    assert eager.config["trainer"]["channels_last"] is False and eager.config["trainer"]["compile"] is False
    assert auto.versions["speed"].startswith("auto: channels_last") and eager.versions["speed"].startswith("eager")
    run_dir = tmp_path / "speed" / "auto"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["channels_last"] is True
    assert json.loads((run_dir / "versions.json").read_text())["speed"] == auto.versions["speed"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "hparams"))
    acc.Reload()
    content = b"".join(acc.PluginTagToContent("hparams").values())
    assert b"speed_setting" in content and b"trainer.channels_last" in content and b"channels_last" in content
    a = [v for _, v in auto.history["train/loss"]]
    e = [v for _, v in eager.history["train/loss"]]
    assert len(a) == len(e) == 4 and a[0] == pytest.approx(e[0], rel=1e-5)
    assert a == pytest.approx(e, rel=1e-3, abs=1e-4)
    for k, v in eager.final.items():
        assert auto.final[k] == pytest.approx(v, rel=1e-3, abs=1e-3), k


def test_auto_rule_table_and_overrides(tmp_path):
    from normablate import speed

    def resolved(*extra, base=TINY_CNN):
        cfg = _cfg(tmp_path, *extra, base=base)
        why = speed.resolve(cfg, tmp_path / "nowhere", resuming=False, write=False)
        return cfg.trainer.channels_last, cfg.trainer.compile, why

    assert resolved("model.norm=bn")[:2] == (True, False)
    assert resolved("model.norm=batch_renorm")[:2] == (False, False)  # measured slower in NHWC
    assert resolved("model.norm={name: bn, ghost_batch_size: 4}")[:2] == (False, False)  # fused ghost kernel: NCHW
    assert resolved("model.norm=bn", "trainer.speed=eager")[:2] == (False, False)
    assert resolved("model.norm=bn", "trainer.channels_last=false")[:2] == (False, False)  # explicit wins
    assert resolved("model.norm=bn", "trainer.speed=eager", "trainer.channels_last=true")[:2] == (True, False)
    lm = ["model.backbone=transformer_lm", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
          "data.source=synthetic"]
    assert resolved("model.norm=ln", base=lm)[:2] == (False, False)
    with pytest.raises(nb.ConfigError, match="trainer.speed"):
        _cfg(tmp_path, "trainer.speed=fast")


def test_experiment_pin_keeps_the_choice_for_later_runs(tmp_path, monkeypatch):
    """The experiment's first run pins its setting; a later run of the same model signature there (a seed appended
    to a study) takes the pinned setting even if the rule table changed in between."""
    from normablate import speed

    first = _cfg(tmp_path, "model.norm=bn", "seed=0")
    speed.resolve(first, tmp_path / "r0", resuming=False)
    assert first.trainer.channels_last is True
    monkeypatch.setattr(speed, "rule", lambda cfg: ({"channels_last": False, "compile": False}, "new table"))
    later = _cfg(tmp_path, "model.norm=bn", "seed=3")
    why = speed.resolve(later, tmp_path / "r3", resuming=False)
    assert later.trainer.channels_last is True and "pinned by" in why
    import yaml  # a study run before pins existed (config.yaml says channels_last false): later seeds follow it

    old_run = tmp_path / "speed" / "t0000-gn"
    old_run.mkdir(parents=True)
    d = yaml.safe_load(__import__("normablate.config", fromlist=["to_yaml"]).to_yaml(_cfg(tmp_path, "model.norm=gn")))
    d["trainer"].update(channels_last=False, compile=False)
    (old_run / "config.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.undo()
    appended = _cfg(tmp_path, "model.norm=gn", "seed=5")
    why = speed.resolve(appended, tmp_path / "r5", resuming=False)
    assert appended.trainer.channels_last is False and "earlier run t0000-gn" in why
    monkeypatch.setattr(speed, "rule", lambda cfg: ({"channels_last": False, "compile": False}, "new table"))
    other = _cfg(tmp_path, "model.norm=ln", "seed=3")  # another signature: the (new) rule decides
    speed.resolve(other, tmp_path / "r4", resuming=False)
    assert other.trainer.channels_last is False


def test_resume_keeps_the_runs_setting(tmp_path):
    """A run started eager (e.g. before trainer.speed existed) resumes eager under speed=auto, and an explicit
    override on resume is ignored; the resumed run equals the uninterrupted eager run."""
    import lightning as L

    from normablate.train import train

    class StopAt(L.Callback):  # Ctrl-C during step 3 (between the validations at 2 and 4)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                monitor = next(c for c in trainer.callbacks if type(c).__name__ == "RunMonitor")
                monitor.stop_request.signum = 2

    full = train(_cfg(tmp_path, "model.norm=bn", "run=full", "trainer.speed=eager"))
    cut = train(_cfg(tmp_path, "model.norm=bn", "run=cut", "trainer.speed=eager"), callbacks=[StopAt()])
    assert cut.status == "interrupted"
    resumed = train(_cfg(tmp_path, "model.norm=bn", "run=cut", "trainer.channels_last=true"), resume=True)
    assert resumed.status == "completed" and resumed.config["trainer"]["channels_last"] is False
    assert resumed.versions["speed"].startswith("resumed") and "ignored" in resumed.versions["speed"]
    assert resumed.final == full.final


# ------------------------------------------------------------------------------------------ trainer.batchstat_gap
def test_batchstat_gap_every_final_off(tmp_path):
    """final: the batch-statistics pass only at the last validation (the end point, no curve); off: never; the
    older boolean key is an alias and a contradiction is refused."""
    from normablate.train import train

    final = train(_cfg(tmp_path, "model.norm=bn", "run=final", "trainer.batchstat_gap=final"))
    assert [s for s, _ in final.history["val/loss"]] == [2, 4]
    assert [s for s, _ in final.history["val/train_eval_gap"]] == [4]
    assert "val/train_eval_gap" in final.final and "val/loss_batchstats" in final.final
    off = _cfg(tmp_path, "model.norm=bn", "trainer.track_batchstat_gap=false")
    assert off.trainer.batchstat_gap == "off" and off.trainer.track_batchstat_gap is None
    assert _cfg(tmp_path, "trainer.track_batchstat_gap=true").trainer.batchstat_gap == "every"
    with pytest.raises(nb.ConfigError, match="batchstat_gap"):
        _cfg(tmp_path, "trainer.track_batchstat_gap=false", "trainer.batchstat_gap=final")
    with pytest.raises(nb.ConfigError, match="batchstat_gap"):
        _cfg(tmp_path, "trainer.batchstat_gap=sometimes")
    from normablate.tasks import ClassificationTask

    model = nb.models.create("resnet20", norm="bn", num_classes=10, width=4)
    assert ClassificationTask(model, off.optim, 4, 10, "off").batchstat_gap == "off"
    assert ClassificationTask(model, off.optim, 4, 10, True).batchstat_gap == "every"
    ln = nb.models.create("resnet20", norm="ln", num_classes=10, width=4)  # no batch statistics: nothing to do
    assert ClassificationTask(ln, off.optim, 4, 10, "every").batchstat_gap == "off"
