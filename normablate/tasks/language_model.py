"""Causal language modelling: token-level cross-entropy ignoring padding (-100 targets), perplexity."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ..config import OptimConfig
from .base import NormTask


class LanguageModelTask(NormTask):
    def __init__(self, model: nn.Module, optim: OptimConfig, max_steps: int, track_batchstat_gap: bool | str = True):
        super().__init__(model, optim, max_steps, track_batchstat_gap)
        # token-weighted mean NLL; perplexity = exp(mean NLL) over all real target tokens of the split
        self.val_nll = nn.ModuleDict({p: MeanMetric() for p in ("val", "val_batchstats", "val_precise")})

    @staticmethod
    def example_inputs(cfg, datamodule, n: int) -> tuple[tuple, dict]:
        T = cfg.data.block_size
        mask = torch.ones(n, T, dtype=torch.bool) if cfg.data.mode == "samples" else None  # (B, T): samples pad
        return (torch.zeros(n, T, dtype=torch.long),), {"mask": mask}  # (B, T) token ids

    def _nll(self, batch) -> tuple[torch.Tensor, int]:
        idx, targets, mask = batch  # (B, T), (B, T) with -100 where no real next token, (B, T) bool or None
        logits = self.model(idx, mask=mask)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return loss, int((targets != -100).sum())

    def loss(self, batch) -> torch.Tensor:
        loss, n = self._nll(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # DDP averages the ranks' gradients; weight each rank's token mean by its share of the step's real
            # tokens, so the step optimizes the token mean over the global batch (as one process would).
            total = self.trainer.strategy.reduce(torch.tensor(float(n), device=loss.device), reduce_op="sum")
            loss = loss * (n * world / total.clamp(min=1))
        return loss

    def update_val_metrics(self, batch, prefix: str) -> None:
        loss, n = self._nll(batch)
        if n:
            self.val_nll[prefix].update(loss, weight=n)

    def compute_val_metrics(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, m in self.val_nll.items():
            if m.update_count == 0:
                continue
            nll = m.compute()
            out[f"{prefix}/loss"] = nll
            out[f"{prefix}/ppl"] = torch.exp(nll)
            m.reset()
        return out
