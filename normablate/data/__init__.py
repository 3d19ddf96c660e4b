"""Data: tensors decoded once and cached, batches built on the training device, each a function of (seed, step).

    from normablate.data import build_datamodule
    dm = build_datamodule(cfg.data, task="classification", seed=0)   # VisionDataModule
    dm.setup()                  # decode or read the cache; fills num_classes, in_chans, image_size, ...
    x, y = dm.train_batch(step=0)                  # what training_step receives (also via a Trainer)
    dm = build_datamodule(cfg.data, task="lm", seed=0)               # TextDataModule
    idx, targets, mask = dm.train_batch(step=0)    # mask is None in blocks mode

Files: ``vision.py`` (images), ``text.py`` (bytes), ``synthetic.py`` (embedded procedural data),
``sources.py`` (hub names and local paths), ``cache.py`` (on-disk tensor cache), ``common.py`` (step-indexed
batching shared by both). Module docstrings state each contract.
"""
from __future__ import annotations

from .. import tasks
from .common import StepDataModule
from .text import TextDataModule
from .vision import VisionDataModule


def build_datamodule(cfg, task: str, seed: int) -> StepDataModule:
    """The DataModule of ``task`` (its ``tasks.get(task).datamodule``: images for "classification", text for "lm")
    configured by ``cfg`` (a ``DataConfig``); an unknown task is a ConfigError listing the registered ones."""
    return tasks.get(task).datamodule(cfg, seed)


__all__ = ["build_datamodule", "StepDataModule", "TextDataModule", "VisionDataModule"]
