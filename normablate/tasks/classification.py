"""Image classification: cross-entropy, accuracy (torchmetrics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..config import OptimConfig
from .base import NormTask


class ClassificationTask(NormTask):
    def __init__(self, model: nn.Module, optim: OptimConfig, max_steps: int, num_classes: int,
                 track_batchstat_gap: bool | str = True):
        super().__init__(model, optim, max_steps, track_batchstat_gap)
        self.val_metrics = nn.ModuleDict({
            p: nn.ModuleDict({"loss": MeanMetric(), "acc": MulticlassAccuracy(num_classes, average="micro")})
            for p in ("val", "val_batchstats", "val_precise")
        })

    @classmethod
    def for_run(cls, model: nn.Module, cfg, datamodule) -> ClassificationTask:
        t = cfg.trainer
        return cls(model, cfg.optim, t.max_steps, datamodule.num_classes, t.batchstat_gap)

    @staticmethod
    def example_inputs(cfg, datamodule, n: int) -> tuple[tuple, dict]:
        size = datamodule.image_size  # H, or (H, W) when not square
        h, w = (size, size) if isinstance(size, int) else size
        return (torch.zeros(n, datamodule.in_chans, h, w),), {}  # (B, C, H, W)

    def loss(self, batch) -> torch.Tensor:
        x, y = batch  # (B, 3, H, W), (B,)
        return F.cross_entropy(self.model(x), y)

    def update_val_metrics(self, batch, prefix: str) -> None:
        x, y = batch
        logits = self.model(x)
        m = self.val_metrics[prefix]
        m["loss"].update(F.cross_entropy(logits, y), weight=y.numel())
        m["acc"].update(logits, y)

    def compute_val_metrics(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, m in self.val_metrics.items():
            if m["loss"].update_count == 0:
                continue
            out[f"{prefix}/loss"] = m["loss"].compute()
            out[f"{prefix}/acc"] = m["acc"].compute()
            m["loss"].reset(), m["acc"].reset()
        return out
