"""Lightning habits: LightningCLI spellings (``--print_config``, ``--trainer.max_steps 10``, ``fit``), the
optimizers (``optim.name``), and ``trainer.max_epochs`` as a budget that resolves to steps."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from normablate import cli
from normablate.cli import main
from normablate.config import SECTIONS, DataConfig, OptimConfig, epochs_to_steps, load_config
from normablate.errors import ConfigError
from normablate.tasks.optim import build_optimizer

TINY = ["model.backbone=resnet20", "model.width=4", "data.source=synthetic", "data.batch_size=32",
        "data.train_limit=200", "data.val_limit=64", "data.val_batch_size=64", "data.augment=false",
        "trainer.val_batches=1", "trainer.progress=false", "trainer.track_batchstat_gap=false"]
if "test_limit" in {f.name for f in dataclasses.fields(DataConfig)}:
    TINY.append("data.test_limit=64")  # the end-of-run test evaluation on a few examples


def printed_config(capsys, *argv) -> dict:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return yaml.safe_load(out)


# ------------------------------------------------------------------------------------------ CLI spellings
@pytest.mark.parametrize("argv", [
    ["train", "--trainer.max_steps", "10", "--print-config"],
    ["train", "--trainer.max_steps=10", "--print-config"],
    ["train", "trainer.max_steps=10", "--print_config"],
    ["fit", "--trainer.max_steps", "10", "--print_config"],
])
def test_lightning_spellings_mean_the_normablate_form(capsys, argv):
    cfg = printed_config(capsys, *argv)
    assert cfg["trainer"]["max_steps"] == 10
    assert cfg == printed_config(capsys, "train", "trainer.max_steps=10", "--print-config")


def test_dotted_option_takes_yaml_values(capsys):
    cfg = printed_config(capsys, "train", "--model.norm", "{name: bn, momentum: 0.01}", "--optim.lr", "0.05",
                         "--print-config")
    assert cfg["model"]["norm"] == {"name": "bn", "momentum": 0.01} and cfg["optim"]["lr"] == 0.05


@pytest.mark.parametrize("argv,hint", [
    (["train", "--trainer.progress"], r"--trainer.progress needs a value; .* trainer.progress=VALUE"),
    (["train", "--trainer.progress", "--print-config"], r"trainer.progress=VALUE"),
    (["train", "--trainer.max_steps", "optim.lr=0.1"], r"trainer.max_steps=VALUE"),
    (["test", "--config", "x.yaml"], r"no 'test' subcommand .*normablate evaluate RUN_DIR --split test"),
    (["validate"], r"no 'validate' subcommand .*normablate evaluate RUN_DIR --split val"),
    (["predict"], r"no 'predict' subcommand"),
    (["sweep", "--config", "configs/sweeps/quick.yaml", "--print_config"], r"normablate sweep --config SPEC --check"),
    (["list", "--print-config"], r"normablate list has no --print-config; .*normablate train ... --print-config"),
])
def test_unmappable_habit_is_one_line_hint(capsys, tmp_path, monkeypatch, argv, hint):
    monkeypatch.chdir(cli.__file__.rsplit("/normablate/", 1)[0])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(hint, err), err


def test_underscored_option_maps_to_the_dashed_one_of_that_command():
    parser = cli.build_parser("sweep")
    assert cli.lightning_habits(["sweep", "-c", "s.yaml", "--study_name", "x", "--dry_run"], parser) == \
        ["sweep", "-c", "s.yaml", "--study-name", "x", "--dry-run"]
    # an underscore spelling of an option another command has is left alone (argparse then refuses it)
    parser = cli.build_parser("train")
    assert cli.lightning_habits(["train", "--study_name", "x"], parser) == ["train", "--study_name", "x"]


def test_config_sections_match_the_config():
    assert cli.CONFIG_SECTIONS == tuple(SECTIONS)


@pytest.mark.slow  # a real (2-step) run: ~10 s of CPU
def test_fit_alias_trains(tmp_path, capsys):
    code = main(["fit", *TINY, f"trainer.log_dir={tmp_path}", "--trainer.max_steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"steps\s+2\b", out), out


# ------------------------------------------------------------------------------------------ optimizers
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)  # weight (3, 4): decayed; bias (3,): not
        self.norm = nn.LayerNorm(3)  # weight, bias (3,): not decayed

    def forward(self, x):
        return self.norm(self.lin(x))


OPTIMIZERS = ["sgd", "sgd_nesterov", "adam", "adamw",
              pytest.param("lion", marks=pytest.mark.skipif(
                  __import__("importlib").util.find_spec("lion_pytorch") is None, reason="lion-pytorch not installed"))]


def optim_cfg(name: str, **kw) -> OptimConfig:
    if name == "sgd_nesterov":
        return OptimConfig(name="sgd", nesterov=True, **kw)
    return OptimConfig(name=name, **kw)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_decays_only_matrices(name):
    torch.manual_seed(0)
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(optim_cfg(name, lr=0.01, weight_decay=0.5), model)
    for p in model.parameters():  # no gradient signal: only weight decay can move a parameter
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            assert p.abs().sum() < before[n].abs().sum(), f"{name}: {n} was not decayed"
        else:
            assert torch.equal(p, before[n]), f"{name}: {n} (dim {p.dim()}) moved without a gradient"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_builds_and_lowers_a_loss(name):
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(64, 4)
    y = torch.randn(64, 3)
    lr = {"sgd": 0.1, "sgd_nesterov": 0.1}.get(name, 0.01)
    opt = build_optimizer(optim_cfg(name, lr=lr, weight_decay=0.0), model)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], (name, losses[0], losses[-1])


def test_nesterov_is_torch_nesterov_and_differs_from_heavy_ball():
    def run(cfg=None, ref=None):
        torch.manual_seed(0)
        model = Tiny()
        opt = build_optimizer(cfg, model) if cfg else ref(model)
        x = torch.randn(16, 4)
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    ours = run(OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0))
    ref = run(ref=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True))
    heavy = run(OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.allclose(ours, heavy)


def test_adam_is_torch_adam_with_l2_on_matrices_only():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(OptimConfig(name="adam", lr=0.01, weight_decay=0.1), model)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]


@pytest.mark.parametrize("overrides,message", [
    (["optim.name=adamw", "optim.nesterov=true"], r"optim.nesterov=true applies to optim.name='sgd' only"),
    (["optim.momentum=0", "optim.nesterov=true"], r"optim.nesterov=true needs optim.momentum > 0"),
    (["optim.name=lamb"], r"optim.name='lamb' is not allowed; valid: sgd, adam, adamw, lion"),
])
def test_bad_optimizer_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_lion_without_its_package_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lion_pytorch" else real(name, *a))
    with pytest.raises(ConfigError, match=r"optim.name='lion' needs the lion-pytorch package.*normablate\[lion\]"):
        load_config(None, ["optim.name=lion"])


# ------------------------------------------------------------------------------------------ max_epochs
@pytest.mark.parametrize("epochs,n,bs,steps", [(1, 200, 32, 7), (3, 200, 32, 19), (2, 256, 64, 8), (1, 10, 32, 1)])
def test_epochs_to_steps_counts_samples(epochs, n, bs, steps):
    assert epochs_to_steps(epochs, n, bs) == steps == math.ceil(epochs * n / bs)
    # the run visits epochs * n samples and fewer than one batch more
    assert epochs * n <= steps * bs < epochs * n + bs


def test_epochs_cover_each_example_exactly_max_epochs_times():
    from normablate.data.common import EpochSampler

    n, bs, epochs = 200, 32, 3
    sampler = EpochSampler(n, bs, seed=0)
    seen = torch.cat([sampler(s) for s in range(epochs_to_steps(epochs, n, bs))])
    counts = torch.bincount(seen[:epochs * n], minlength=n)
    assert torch.equal(counts, torch.full((n,), epochs))
    assert len(seen) - epochs * n < bs


def test_max_epochs_and_max_steps_exclusive():
    cfg = load_config(None, ["trainer.max_epochs=2"])
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.max_steps is None
    with pytest.raises(ConfigError, match=r"trainer.max_steps=10 and trainer.max_epochs=2 are both set"):
        load_config(None, ["trainer.max_epochs=2", "trainer.max_steps=10"])
    with pytest.raises(ConfigError, match=r"trainer.max_steps=None and trainer.max_epochs=None: set exactly one"):
        load_config(None, ["trainer.max_steps=null"])
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=0 must be >= 1"):
        load_config(None, ["trainer.max_epochs=0"])
    cfg = load_config(None, ["trainer.max_epochs=null", "trainer.max_steps=7"])
    assert cfg.trainer.max_steps == 7


def test_a_later_layer_switches_the_budget(tmp_path):
    """max_epochs on the command line over a config file (or sweep spec) with max_steps means epochs."""
    from normablate.sweep.spec import load_spec

    path = tmp_path / "run.yaml"
    path.write_text("trainer: {max_steps: 6000}\n")
    cfg = load_config(path, ["trainer.max_epochs=3"])
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (None, 3)
    path.write_text("trainer: {max_epochs: 3}\n")
    cfg = load_config(path, ["trainer.max_steps=7"])
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (7, None)
    spec = {"kind": "grid", "study_name": "b", "metric": "val/acc", "base": {"trainer": {"max_steps": 6000}},
            "overrides": {"trainer.val_every": 5}, "grid": {"model.norm": ["bn"]}}
    s = load_spec(spec, overrides=["trainer.max_epochs=2"])
    c = s.trial_config(s.points()[0], run="x")
    assert (c.trainer.max_steps, c.trainer.max_epochs, c.trainer.val_every) == (None, 2, 5)
    s = load_spec({**spec, "overrides": {"trainer.max_epochs": 4}})  # the spec's overrides over its base
    c = s.trial_config(s.points()[0], run="x")
    assert (c.trainer.max_steps, c.trainer.max_epochs) == (None, 4)
    s = load_spec({**spec, "overrides": {"trainer.max_epochs": 4}}, overrides=["trainer.max_steps=9"])
    c = s.trial_config(s.points()[0], run="x")
    assert (c.trainer.max_steps, c.trainer.max_epochs) == (9, None)


@pytest.mark.slow  # a real (7-step) run
def test_max_epochs_resolves_in_train_and_is_recorded(tmp_path):
    from normablate.train import train

    result = train(load_config(None, [*TINY, f"trainer.log_dir={tmp_path}", "trainer.max_epochs=1",
                                      "trainer.val_every=100"]))
    want = math.ceil(200 / 32)  # 7
    assert result.status == "completed" and result.steps == want
    assert result.config["trainer"]["max_steps"] == want and result.config["trainer"]["max_epochs"] == 1
    # config.yaml keeps the budget as asked, so it reloads (normablate train -c <run>/config.yaml, evaluate)
    recorded = Path(result.run_dir) / "config.yaml"
    assert load_config(recorded).trainer.max_epochs == 1
    stored = json.loads((Path(result.run_dir) / "result.json").read_text())  # result.json: the resolved steps
    assert stored["config"]["trainer"]["max_steps"] == want and stored["config"]["trainer"]["max_epochs"] == 1


def test_batch_size_study_budget_in_epochs():
    from normablate.sweep.spec import load_spec

    spec = {"kind": "batch_size", "study_name": "bs", "metric": "val/acc", "base": {"trainer": {"max_epochs": 2}},
            "grid": {"model.norm": ["bn"], "data.batch_size": [32, 64]}, "base_batch_size": 32}
    s = load_spec(spec)
    assert s.options["budget"] == {"epochs": 2}
    cfgs = {c.data.batch_size: c for c in (s.trial_config(p, run="x") for p in s.points())}
    for c in cfgs.values():
        assert c.trainer.max_epochs == 2 and c.trainer.max_steps is None
    assert cfgs[64].trainer.val_every == cfgs[32].trainer.val_every // 2  # validation at the same samples
    # an explicit samples budget replaces the base's epochs
    s = load_spec({**spec, "budget": {"samples": 640}})
    cfgs = {c.data.batch_size: c for c in (s.trial_config(p, run="x") for p in s.points())}
    assert (cfgs[32].trainer.max_steps, cfgs[64].trainer.max_steps) == (20, 10)
    assert cfgs[32].trainer.max_epochs is None


def test_dry_run_sweep_with_max_epochs(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"kind": "grid", "metric": "val/acc", "log_dir": str(tmp_path / "logs"),
                                    "storage": f"sqlite:///{tmp_path}/o.db",
                                    "base": {"data": {"train_limit": 320, "batch_size": 32},
                                             "trainer": {"max_epochs": 2, "val_every": 5}},
                                    "grid": {"model.norm": ["bn", "none"]}}))
    code = main(["sweep", "--config", str(spec), "--dry-run", "--no-report"])
    assert code == 0, capsys.readouterr().err
    import optuna

    storage = f"sqlite:///{tmp_path}/o.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert len(trials) == 2 and all(t.user_attrs["steps"] == 20 for t in trials)


def test_ctrl_c_outside_a_run_is_one_line_and_status_130(capsys):
    """Ctrl-C while a command sets up (before a run's own handler is installed), or a second Ctrl-C: no traceback."""
    import argparse

    from normablate import cli

    def interrupted(args):
        raise KeyboardInterrupt

    assert cli._run(argparse.Namespace(func=interrupted), debug=False) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted") and "Traceback" not in err
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        cli._run(argparse.Namespace(func=interrupted), debug=True)
