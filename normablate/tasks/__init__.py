"""Tasks, by name: what a run optimizes and how it is judged. The LightningModules (loss, metrics, optimizer; each
receives its network) live in this package's modules; this file is the registry of their facts, so nothing above
it switches on a task's name.

Contract of the registry: an entry is a ``TaskInfo`` holding

- ``module``: the LightningModule class; ``module.for_run(model, cfg, datamodule)`` builds it for a run and
  ``module.example_inputs(cfg, datamodule, n)`` gives a batch of ``n`` inputs for the model's forward (the memory
  estimate's meta-device pass);
- ``datamodule``: the DataModule class, ``datamodule(data_cfg, seed)``;
- ``metrics``: the validation metrics a config may select, target or sweep on (``primary`` first), and
  ``test_metrics`` their test-split names (what a hypothesis may contrast);
- ``direction(metric)``: ``"maximize"`` or ``"minimize"``; ``select``: the metric whose best validation's
  weights are kept by default (``trainer.select_metric``);
- ``unit``: what the throughput counts (``rate``: the word a report's throughput column uses, per second);
  ``chance_outcomes``: how many outcomes a uniform prediction picks among (a number, or the data fact giving it):
  a report's chance levels (accuracy 1/K, loss ln K, perplexity K); ``modality``: ``"images"`` or ``"text"``
  (which sources the data reads);
- ``facts``: the data facts (DataModule attributes after ``setup``) a backbone's options are filled from
  (``models.BackboneInfo.input_options``), ``at_least``: those a model option set in the config must reach (a
  capacity: classes, vocabulary, context), ``exact``: those it must equal (the channels), and
  ``config_facts(data_cfg)``: the ones known before any data is read.

Classes are named by import path and imported on first use: importing this registry imports neither torch nor
Lightning (``normablate list`` and ``--help`` stay fast).

    from normablate import tasks
    tasks.get("lm").primary          # 'val/ppl'
    tasks.get("classification").direction("val/acc")  # 'maximize'
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..registry import Registry

REGISTRY = Registry("task", __doc__ or "")
DIRECTIONS = ("maximize", "minimize")


def _load(obj: Any) -> Any:
    """A class given as ``"pkg.mod:Name"`` imported (once Python caches the module), or the object itself."""
    if not isinstance(obj, str):
        return obj
    from ..plugins import import_object

    return import_object(obj, "task class")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class TaskInfo:
    """Every fact about one task (module docstring); ``tasks.get(name)`` returns it."""

    name: str
    module_path: Any  # the LightningModule class, or "pkg.mod:Class" (imported on first use)
    datamodule_path: Any  # the DataModule class, or "pkg.mod:Class"
    metrics: tuple[str, ...]  # validation metrics a config may name, the primary first
    primary: str  # the metric a study reports by default ("val/acc", "val/ppl")
    directions: Mapping[str, str]  # base metric name ("acc", "loss", "ppl") -> "maximize" | "minimize"
    unit: str  # what the throughput counts ("images", "real tokens")
    modality: str  # "images" | "text": the kind of data its sources hold
    select: str  # default trainer.select_metric
    facts: tuple[str, ...] = ()  # DataModule attributes a backbone option may be filled from
    at_least: Mapping[str, str] = field(default_factory=dict)  # capacity fact -> what it is, for the error message
    exact: tuple[str, ...] = ()  # facts a model option set in the config must equal (the image channels)
    config_facts: Callable[[Any], dict[str, Any]] = lambda data_cfg: {}  # facts known from the DataConfig alone
    rate: str = "samples"  # a report's throughput column: "throughput (<rate>/s)"
    chance_outcomes: int | str | None = None  # K of a uniform prediction: a count, or the fact naming it; None: unknown

    @property
    def module(self) -> type:
        return _load(self.module_path)

    @property
    def datamodule(self) -> type:
        return _load(self.datamodule_path)

    @property
    def test_metrics(self) -> tuple[str, ...]:
        return tuple("test/" + m.split("/", 1)[1] for m in self.metrics)

    def direction(self, metric: str, default: str | None = None) -> str:
        """``"maximize"`` or ``"minimize"`` for ``metric`` of any split or variant (``val/acc``, ``test/loss``,
        ``val/acc_batchstats``): the longest registered prefix of its base name at a ``_`` (``top_1`` of
        ``val/top_1`` and ``val/top_1_batchstats``, ``acc`` of ``val/acc_batchstats``); an unknown metric is a
        ConfigError unless a ``default`` is given."""
        name = metric.rsplit("/", 1)[-1]
        for i in range(name.count("_") + 1):  # the full name, then shorter prefixes
            base = name.rsplit("_", i)[0]
            if base in self.directions:
                return self.directions[base]
        if default is not None:
            return default
        raise ConfigError(f"metric {metric!r} is not one of task {self.name!r}'s; valid: {', '.join(self.metrics)}")

    def check_inputs(self, option_of: Mapping[str, str], options: Mapping[str, Any],
                     facts: Mapping[str, Any]) -> None:
        """A model option the config sets against the data fact it stands for: below a capacity (``at_least``:
        classes, vocabulary, context) or unlike a fixed one (``exact``: the channels) is a ConfigError, before
        any step, since the model could not take what the data produces. ``option_of``: builder option -> fact
        (``BackboneInfo.input_options``); ``facts``: the values known so far."""
        for opt, fact in option_of.items():
            value, need = options.get(opt), facts.get(fact)
            if value is None or need is None:
                continue
            if fact in self.at_least and _number(value) and _number(need) and value < need:
                raise ConfigError(f"model.{opt}={value} is smaller than {self.at_least[fact]} ({need}): the model "
                                  f"cannot take what the data produces")
            if fact in self.exact and value != need:
                raise ConfigError(f"model.{opt}={value} does not match the data's {fact} ({need}): the model cannot "
                                  f"take what the data produces (leave model.{opt} unset to take the data's)")


def register(name: str, module: Any, datamodule: Any, metrics: tuple[str, ...], primary: str,
             direction: Mapping[str, str], unit: str, modality: str, select: str | None = None,
             facts: tuple[str, ...] = (), at_least: Mapping[str, str] | None = None, exact: tuple[str, ...] = (),
             config_facts: Callable[[Any], dict[str, Any]] | None = None, rate: str = "samples",
             chance_outcomes: int | str | None = None) -> TaskInfo:
    """Register a task with its facts (module docstring). ``direction`` maps each metric's base name (``"acc"``)
    to ``"maximize"`` or ``"minimize"``; ``select`` defaults to ``primary``."""
    metrics = tuple(metrics)
    if primary not in metrics:
        raise ConfigError(f"task {name!r}: primary={primary!r} is not one of its metrics {list(metrics)}")
    bad = {k: v for k, v in direction.items() if v not in DIRECTIONS}
    if bad:
        raise ConfigError(f"task {name!r}: direction {bad} is not allowed; valid: {', '.join(DIRECTIONS)}")
    info = TaskInfo(name, module, datamodule, metrics, primary, dict(direction), unit, modality, select or primary,
                    tuple(facts), dict(at_least or {}), tuple(exact), config_facts or (lambda data_cfg: {}), rate,
                    chance_outcomes)
    missing = [m for m in metrics if info.direction(m, default="?") == "?"]
    if missing:
        raise ConfigError(f"task {name!r}: metrics {missing} have no direction; give direction={{name: maximize|"
                          f"minimize}}")
    REGISTRY.register(name, info)
    return info


def get(name: str) -> TaskInfo:
    """The facts of task ``name``; an unknown name is a ConfigError listing the registered ones."""
    info = REGISTRY.get(name)
    if not isinstance(info, TaskInfo):
        raise ConfigError(f"task {name!r} is not a registered task; valid: {', '.join(available())}")
    return info


def available() -> list[str]:
    return REGISTRY.available()


register("classification", module="normablate.tasks.classification:ClassificationTask",
         datamodule="normablate.data.vision:VisionDataModule", metrics=("val/acc", "val/loss"), primary="val/acc",
         direction={"acc": "maximize", "loss": "minimize"}, unit="images", modality="images", select="val/acc",
         facts=("num_classes", "in_chans", "image_size"),
         at_least={"num_classes": "the number of classes of data.source"},
         exact=("in_chans",),  # not image_size: a timm ViT with dynamic_img_size: true takes other sizes
         chance_outcomes="num_classes")  # the run's model.num_classes, else the source's known class count
register("lm", module="normablate.tasks.language_model:LanguageModelTask",
         datamodule="normablate.data.text:TextDataModule", metrics=("val/ppl", "val/loss"), primary="val/ppl",
         direction={"ppl": "minimize", "loss": "minimize"}, unit="real tokens", modality="text",
         select="val/loss",  # = the perplexity's choice (exp is monotone), under the name the loss curves use
         facts=("vocab_size", "block_size"),
         at_least={"vocab_size": "the byte vocabulary", "block_size": "data.block_size"},
         # byte-level tokens (data/text.py VOCAB_SIZE); the data's sequences are data.block_size long
         config_facts=lambda data_cfg: {"vocab_size": 256, "block_size": data_cfg.block_size},
         rate="tokens", chance_outcomes=256)  # the byte vocabulary

_CLASSES = {"NormTask": ".base", "using_batch_statistics": ".base", "ClassificationTask": ".classification",
            "LanguageModelTask": ".language_model"}


def __getattr__(name: str) -> Any:  # the LightningModules, imported on first use (PEP 562)
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REGISTRY", "TaskInfo", "available", "get", "register", *_CLASSES]
