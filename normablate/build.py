"""Building a run's parts from a validated config: the model (``build_model``) and the LightningModule of its task
(``build_task``). Shared by ``train`` (one run), ``evaluate`` (a saved run) and ``footprint`` (the memory estimate on
the meta device), so none of them imports another for it."""
from __future__ import annotations

import logging
import warnings

import torch

from . import models
from .config import RunConfig
from .errors import ConfigError


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


def build_model(cfg: RunConfig, datamodule) -> torch.nn.Module:
    options = dict(cfg.model.options)
    if cfg.task == "classification":
        options.setdefault("num_classes", datamodule.num_classes)
        if options["num_classes"] < datamodule.num_classes:
            raise ConfigError(f"model.num_classes={options['num_classes']} is smaller than the "
                              f"{datamodule.num_classes} classes of data.source={cfg.data.source!r}")
        if "in_chans" in models.options(cfg.model.backbone):
            options.setdefault("in_chans", datamodule.in_chans)
        if cfg.model.backbone == "vit":
            options.setdefault("img_size", datamodule.image_size)
    else:
        options.setdefault("vocab_size", datamodule.vocab_size)
        options.setdefault("block_size", cfg.data.block_size)
    return models.create(cfg.model.backbone, norm=cfg.model.norm, **options)


def build_task(cfg: RunConfig, model: torch.nn.Module, datamodule):
    """The LightningModule of ``cfg.task`` around ``model``."""
    from .tasks import ClassificationTask, LanguageModelTask

    t = cfg.trainer
    if cfg.task == "classification":
        return ClassificationTask(model, cfg.optim, t.max_steps, datamodule.num_classes, t.batchstat_gap)
    return LanguageModelTask(model, cfg.optim, t.max_steps, t.batchstat_gap)


