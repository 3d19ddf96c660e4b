"""Building a run's parts from a validated config: the model (``build_model``) and the LightningModule of its task
(``build_task``). Shared by ``train`` (one run), ``evaluate`` (a saved run) and ``footprint`` (the memory estimate on
the meta device), so none of them imports another for it."""
from __future__ import annotations

import logging
import warnings

import torch

from . import models, tasks
from .config import RunConfig


def quiet_lightning() -> None:
    """Lightning's INFO lines and the warnings that do not apply to our set-up (step-indexed data, one process
    per rank) off; a run's own messages stay."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__`.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # DDP: validation metrics are torchmetrics objects, already reduced over ranks when computed
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def model_options(cfg: RunConfig, datamodule) -> dict:
    """The backbone's options for this run: the config's, and those its task's data facts fill when the config
    leaves them unset (``models.BackboneInfo.input_options``: e.g. ``num_classes``, the ViT's ``img_size``, the LM's
    ``vocab_size`` and ``block_size``). An option set below a capacity of the data (classes, vocabulary, context) is
    a ConfigError."""
    info, task = models.info(cfg.model.backbone), tasks.get(cfg.task)
    options = dict(cfg.model.options)
    facts = {f: getattr(datamodule, f) for f in task.facts if hasattr(datamodule, f)}
    option_of = info.input_options(task.facts)
    task.check_inputs(option_of, options, facts)
    for opt, fact in option_of.items():
        if fact in facts:
            options.setdefault(opt, facts[fact])
    return options


def build_model(cfg: RunConfig, datamodule) -> torch.nn.Module:
    """The run's network, on the current default device (``model_options`` for its options)."""
    return models.create(cfg.model.backbone, norm=cfg.model.norm, **model_options(cfg, datamodule))


def build_task(cfg: RunConfig, model: torch.nn.Module, datamodule):
    """The LightningModule of ``cfg.task`` around ``model`` (``tasks.get(cfg.task).module.for_run``)."""
    return tasks.get(cfg.task).module.for_run(model, cfg, datamodule)
