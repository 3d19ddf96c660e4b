"""Registries as the single source of facts (issue 27, steps 1 and 4): ``models.info`` and ``tasks.get`` carry what
the framework needs about a backbone and a task; plug-in backbones train end to end through ``normablate.train``;
a run validates its config once and builds its model once."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn

import normablate.models as models
import normablate.norms as norms
from normablate import config, footprint, tasks
from normablate.config import load_config
from normablate.errors import ConfigError
from normablate.train import train

TINY = ["trainer.max_steps=3", "trainer.val_every=3", "trainer.val_batches=1", "trainer.progress=false",
        "trainer.loggers=[]", "data.batch_size=8", "data.val_batch_size=16", "data.train_limit=64",
        "data.val_limit=16", "data.test_limit=16", "optim.name=adamw", "optim.lr=1e-3"]


@pytest.fixture
def plugins():
    """Register the test's plug-in backbones; each records the options its builder received."""
    seen: dict[str, dict] = {}

    class TinyLM(nn.Module):  # (B, T) token ids -> (B, T, V) logits; its norm sees the padding mask
        def __init__(self, norm_layer, vocab_size, block_size, width):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(block_size, width)
            self.norm, self.head = norm_layer(width), nn.Linear(width, vocab_size)

        def forward(self, idx, mask=None):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
            return self.head(self.norm(x, mask=mask))

    @models.register("h1_tiny_lm", layout="tokens", task="lm")
    def tiny_lm(norm_layer, vocab_size: int = 300, block_size: int = 512, width: int = 16):
        seen["h1_tiny_lm"] = {"vocab_size": vocab_size, "block_size": block_size}
        return TinyLM(norm_layer, vocab_size, block_size, width)

    @models.register("h1_fixed_mlp", layout="image", task="classification",
                     inputs={"side": "image_size", "classes": "num_classes"})
    def fixed_mlp(norm_layer, side: int = 7, classes: int = 3, in_chans: int = 1):
        """Takes exactly side x side images: the input size must come from the data, not the defaults."""
        seen["h1_fixed_mlp"] = {"side": side, "classes": classes, "in_chans": in_chans}
        return nn.Sequential(nn.Conv2d(in_chans, 4, 1), norm_layer(4), nn.Flatten(), nn.Linear(4 * side * side, classes))

    yield seen
    for name in ("h1_tiny_lm", "h1_fixed_mlp"):
        models.REGISTRY.unregister(name)


# ------------------------------------------------------------------------------------------ plug-ins train
@pytest.mark.parametrize("task", [[], ["task=lm"]])
def test_a_plugin_lm_backbone_trains_with_task_lm(tmp_path, plugins, task):
    cfg = load_config(None, [*TINY, "model.backbone=h1_tiny_lm", "model.norm=masked_bn", "data.mode=samples",
                             "data.block_size=24", f"trainer.log_dir={tmp_path}", *task])
    assert cfg.task == "lm"  # the backbone's own task when the config names none
    result = train(cfg)
    assert result.status == "completed" and result.steps == 3
    assert set(result.final) >= {"val/ppl", "val/loss"} and set(result.test) >= {"test/ppl", "test/loss"}
    # the data's facts filled the options the config left unset: byte vocabulary, the data's context
    assert plugins["h1_tiny_lm"] == {"vocab_size": 256, "block_size": 24}


def test_a_plugin_image_backbone_gets_its_input_size_from_the_data(tmp_path, plugins):
    result = train(load_config(None, [*TINY, "model.backbone=h1_fixed_mlp", "model.norm=bn",
                                      f"trainer.log_dir={tmp_path}"]))
    assert result.status == "completed" and "val/acc" in result.final and "test/acc" in result.test
    assert plugins["h1_fixed_mlp"] == {"side": 32, "classes": 10, "in_chans": 3}  # synthetic: 3 x 32 x 32, 10 classes


@pytest.mark.parametrize("override,message", [
    ("model.classes=4", r"model.classes=4 is smaller than the number of classes of data.source \(10\)"),
    ("model.in_chans=1", r"model.in_chans=1 does not match the data's in_chans \(3\)"),
])
def test_a_plugin_option_against_the_data_is_refused_before_any_step(tmp_path, plugins, override, message):
    cfg = load_config(None, [*TINY, "model.backbone=h1_fixed_mlp", f"trainer.log_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not list(tmp_path.rglob("last.ckpt"))


def test_lm_capacities_known_from_the_config_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"model.block_size=16 is smaller than data.block_size \(32\)"):
        load_config(None, ["model.backbone=transformer_lm", "model.block_size=16", "data.block_size=32"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 is smaller than the byte vocabulary \(256\)"):
        load_config(None, ["model.backbone=transformer_lm", "model.vocab_size=100"])


def test_a_task_that_does_not_fit_the_backbone_is_refused(plugins):
    with pytest.raises(ConfigError, match=r"task='classification' does not fit backbone 'h1_tiny_lm'; use task='lm'"):
        load_config(None, ["model.backbone=h1_tiny_lm", "task=classification"])
    with pytest.raises(ConfigError, match=r"config key task='seg' is not allowed; valid: classification, lm"):
        load_config(None, ["task=seg"])


# ------------------------------------------------------------------------------------------ the facts
def test_builtin_backbones_carry_their_facts():
    expect = {"resnet20": ("image", "classification"), "resnet56": ("image", "classification"),
              "resnet18": ("image", "classification"), "vgg11": ("image", "classification"),
              "vgg16": ("image", "classification"), "vit": ("tokens", "classification"),
              "transformer_lm": ("tokens", "lm")}
    for name, (layout, task) in expect.items():
        info = models.info(name)
        assert (info.name, info.layout, info.task) == (name, layout, task)
        assert info.options == models.options(name) and "norm_layer" not in info.options
        with pytest.raises(Exception):
            info.layout = "tokens"  # frozen
    assert models.info("vit").input_options(tasks.get("classification").facts) == {
        "num_classes": "num_classes", "in_chans": "in_chans", "img_size": "image_size"}
    assert models.info("transformer_lm").input_options(tasks.get("lm").facts) == {
        "vocab_size": "vocab_size", "block_size": "block_size"}
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet21'.*did you mean 'resnet20'"):
        models.info("resnet21")


def test_registering_inputs_that_are_no_builder_options_is_refused():
    with pytest.raises(ConfigError, match=r"inputs name \['size'\], which are not options of its builder"):
        models.register("h1_bad", layout="image", inputs={"size": "image_size"})(lambda norm_layer, side=1: None)
    assert "h1_bad" not in models.available()


def test_tasks_carry_their_facts():
    c, lm = tasks.get("classification"), tasks.get("lm")
    assert (c.primary, c.metrics, c.test_metrics, c.unit, c.select) == (
        "val/acc", ("val/acc", "val/loss"), ("test/acc", "test/loss"), "images", "val/acc")
    assert (lm.primary, lm.metrics, lm.test_metrics, lm.unit, lm.select) == (
        "val/ppl", ("val/ppl", "val/loss"), ("test/ppl", "test/loss"), "real tokens", "val/loss")
    assert [c.direction(m) for m in ("val/acc", "test/acc", "val/acc_batchstats", "val/loss")] == \
        ["maximize", "maximize", "maximize", "minimize"]
    assert [lm.direction(m) for m in ("val/ppl", "test/loss")] == ["minimize", "minimize"]
    with pytest.raises(ConfigError, match=r"metric 'val/acc' is not one of task 'lm''s; valid: val/ppl, val/loss"):
        lm.direction("val/acc")
    assert c.module.__name__ == "ClassificationTask" and lm.datamodule.__name__ == "TextDataModule"
    with pytest.raises(ConfigError, match=r"unknown task 'segmentation'; valid: classification, lm"):
        tasks.get("segmentation")


def test_the_task_registry_imports_neither_torch_nor_lightning():
    probe = ("import sys, normablate.tasks as t; t.get('lm').direction('val/ppl'); "
             "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ validated and built once
def test_a_run_validates_its_config_once_and_builds_its_model_once(tmp_path, monkeypatch):
    calls: Counter = Counter()
    devices: list[str] = []  # where each built model's parameters live

    def spy(owner, name, record=None):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            calls[name] += 1
            out = fn(*a, **k)
            if record is not None:
                record(out)
            return out

        monkeypatch.setattr(owner, name, wrapped)

    spy(models, "create", lambda net: devices.append(next(net.parameters()).device.type))
    spy(norms, "resolve")
    spy(config, "validate")
    cfg = load_config(None, [*TINY, "model.width=4", f"trainer.log_dir={tmp_path}"])
    assert calls == Counter({"validate": 1, "create": 1, "resolve": 1}) and devices == ["meta"]
    calls.clear()
    devices.clear()
    result = train(cfg)
    assert result.status == "completed"
    # no second validation of an unchanged config; one build, the real one (footprint's checks reuse it)
    assert calls == Counter({"create": 1, "resolve": 1}) and devices == ["cpu"]


def test_a_config_changed_after_validation_is_validated_again(tmp_path):
    cfg = load_config(None, [*TINY, f"trainer.log_dir={tmp_path}"])
    assert config.is_validated(cfg)
    cfg.optim.lr = -1.0
    assert not config.is_validated(cfg) and config.validated_params(cfg) is not None  # the model is unchanged
    with pytest.raises(ConfigError, match=r"optim.lr=-1.0 must be > 0"):
        train(cfg)
    cfg.optim.lr = 1e-3
    cfg.model.options["width"] = 4
    assert config.validated_params(cfg) is None


@pytest.mark.parametrize("overrides", [
    ["model.width=4"],
    ["model.backbone=vit", "model.depth=1", "model.embed_dim=48", "model.num_heads=2"],
    ["model.backbone=transformer_lm", "model.n_layer=1", "model.n_embd=32", "data.block_size=32", "data.mode=samples"],
])
def test_the_estimate_from_the_built_model_equals_the_meta_build(overrides):
    """footprint.estimate on train's model (its meta twin) gives the numbers of a model built on the meta device, and
    leaves the real model's tensors real."""
    from normablate.build import build_model
    from normablate.data import build_datamodule

    cfg = load_config(None, [*TINY, *overrides])
    dm = build_datamodule(cfg.data, cfg.task, cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(cfg, dm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert footprint.estimate(cfg, dm, model) == footprint.estimate(cfg, dm)
    assert footprint.estimate(cfg, dm, model).activation_bytes > 0
    assert footprint.estimate(cfg).params == sum(p.numel() for p in models.create(
        cfg.model.backbone, norm=cfg.model.norm, **cfg.model.options).parameters())  # the count validate recorded
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())



# ------------------------------------------------------------------------------------------ plug-in task facts
@pytest.fixture
def f1_task():
    """A plug-in task whose primary metric is ``val/f1`` (maximize) and a backbone of it. Its validation F1 is
    scripted by step (0.2, 0.9, 0.5 at steps 2, 4, 6): the best validation is the middle one."""
    from normablate.tasks.classification import ClassificationTask

    script = {2: 0.2, 4: 0.9, 6: 0.5}

    class F1Task(ClassificationTask):
        def compute_val_metrics(self):
            out = {k.replace("/acc", "/f1"): v for k, v in super().compute_val_metrics().items()}
            if "val/f1" in out and not self.trainer.testing:
                out["val/f1"] = torch.tensor(script.get(self.global_step, 0.0))
            return out

    tasks.register("r1_f1", module=F1Task, datamodule="normablate.data.vision:VisionDataModule",
                   metrics=("val/f1", "val/loss"), primary="val/f1", direction={"f1": "maximize", "loss": "minimize"},
                   unit="images", modality="images", facts=("num_classes", "in_chans"))

    @models.register("r1_f1_mlp", layout="image", task="r1_f1")
    def f1_mlp(norm_layer, num_classes: int = 10, in_chans: int = 3):
        return nn.Sequential(nn.Conv2d(in_chans, 4, 1), norm_layer(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    yield script
    models.REGISTRY.unregister("r1_f1_mlp")
    tasks.REGISTRY.unregister("r1_f1")


def test_a_plugin_tasks_maximized_metric_keeps_its_best_weights_and_reaches_its_target(tmp_path, f1_task):
    cfg = load_config(None, [*TINY, "model.backbone=r1_f1_mlp", "model.norm=bn", "trainer.max_steps=6",
                             "trainer.val_every=2", "trainer.target_metric=val/f1", "trainer.target_value=0.85",
                             f"trainer.log_dir={tmp_path}"])
    assert cfg.task == "r1_f1"
    result = train(cfg)
    assert result.status == "completed" and result.final["val/f1"] == pytest.approx(0.5)
    saved = torch.load(next(tmp_path.rglob("best.pt")), weights_only=True)
    assert (saved["metric"], saved["step"], saved["value"]) == ("val/f1", 4, pytest.approx(0.9))  # higher is better
    assert result.best["val/f1"] == pytest.approx(0.9)
    assert result.steps_to_target == 4  # the first validation with F1 >= 0.85 (not the first <= 0.85, step 2)


def test_a_metric_name_with_an_underscore_gets_its_registered_direction():
    info = tasks.register("r1_topk", module="x:Y", datamodule="x:Z", metrics=("val/top_1", "val/loss"),
                          primary="val/top_1", direction={"top_1": "maximize", "loss": "minimize"}, unit="images",
                          modality="images")
    try:
        assert [info.direction(m) for m in ("val/top_1", "test/top_1", "val/top_1_batchstats", "val/loss_batchstats")
                ] == ["maximize", "maximize", "maximize", "minimize"]
        with pytest.raises(ConfigError, match=r"metric 'val/top' is not one of task 'r1_topk''s"):
            info.direction("val/top")
    finally:
        tasks.REGISTRY.unregister("r1_topk")


def test_a_backbone_registered_with_an_unknown_task_names_its_registration():
    models.register("r1_lmm_net", layout="tokens", task="lmm")(lambda norm_layer: nn.Identity())
    try:
        with pytest.raises(ConfigError, match=r"backbone 'r1_lmm_net' is registered with task='lmm' \(models.register"
                                              r"\('r1_lmm_net', \.\.\., task='lmm'\)\), which is not a registered task; "
                                              r"valid: classification, lm.*did you mean 'lm'"):
            load_config(None, ["model.backbone=r1_lmm_net"])
    finally:
        models.REGISTRY.unregister("r1_lmm_net")


def _trials(task, **cols):
    import pandas as pd

    from normablate.analysis.data import StudyData

    rows = [{"norm": n, "seed": s, "state": "complete", "diverged": False, "task": task, "source": "synthetic",
             "final_val_acc": 0.5, "throughput": 100.0 + s, **cols} for n in ("bn", "none") for s in (0, 1)]
    return StudyData("facts", "mem", None, pd.DataFrame(rows), len(rows), group_cols=["norm"])


def test_reports_read_chance_levels_and_the_throughput_unit_from_the_task():
    import math

    from normablate.analysis import plots, tables

    lm, cls = _trials("lm"), _trials("classification")
    assert [plots.chance(lm, m) for m in ("val/ppl", "val/loss", "train/loss", "val/acc")] == \
        [256.0, math.log(256), math.log(256), None]  # the byte vocabulary
    assert [plots.chance(cls, m) for m in ("val/acc", "val/loss", "val/ppl")] == [0.1, math.log(10), None]
    assert plots.chance(_trials("classification", num_classes=100), "val/acc") == 0.01
    assert plots.chance(_trials("classification", source="mystery"), "val/acc") is None  # classes unknown
    tasks.register("r1_fourway", module="x:Y", datamodule="x:Z", metrics=("val/acc", "val/loss"), primary="val/acc",
                   direction={"acc": "maximize", "loss": "minimize"}, unit="clips", modality="images", rate="clips",
                   chance_outcomes=4)
    try:
        plug = _trials("r1_fourway")
        assert (plots.chance(plug, "val/acc"), plots.chance(plug, "val/loss")) == (0.25, math.log(4))
        assert tables.study_task(plug).rate == "clips"
    finally:
        tasks.REGISTRY.unregister("r1_fourway")
    assert (tables.study_task(lm).rate, tables.study_task(cls).rate) == ("tokens", "samples")
    assert tables.study_task(_trials(None)) is None


def test_a_verdict_on_a_plugin_tasks_maximized_metric_reads_its_direction_from_the_task(f1_task):
    import numpy as np
    import pandas as pd

    from normablate.analysis import verdicts
    from normablate.analysis.data import StudyData
    from normablate.sweep.spec import load_spec

    h = {"id": "f1", "claim": "BN has the higher F1", "type": "superiority",
         "contrast": {"a": {"model.norm": "bn"}, "b": {"model.norm": "none"}, "metric": "test/f1",
                      "at": {"fixed": {"optim.lr": 0.1}}}}
    spec = load_spec({"kind": "lr_sensitivity", "study_name": "f1", "metric": "val/f1", "hypotheses": [h],
                      "base": {"model": {"backbone": "r1_f1_mlp", "norm": "bn"}, "data": {"source": "synthetic"}},
                      "grid": {"seed": [0, 1, 2, 3, 4, 5], "optim.lr": [0.01, 0.1], "model.norm": ["bn", "none"]}})
    assert (spec.task, spec.direction) == ("r1_f1", "maximize")
    rng = np.random.default_rng(0)
    rows = [{"trial": p.index, "point": p.index, "seed": p.values["seed"], "lr": p.values["optim.lr"],
             "norm": p.values["model.norm"], "state": "complete", "diverged": False, "task": "r1_f1",
             "final_val_f1": 0.5, "final_test_f1": (0.8 if p.values["model.norm"] == "bn" else 0.7)
             + rng.normal(0, 0.005)} for p in spec.points()]
    (v,) = verdicts.evaluate(StudyData("f1", "mem", spec, pd.DataFrame(rows), spec.total))
    assert (v.direction, v.word) == ("maximize", "supported")  # higher F1 is better: BN's 0.8 beats 0.7
