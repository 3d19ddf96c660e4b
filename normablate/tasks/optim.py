"""Optimizers and LR schedules, identical for every norm so an ablation stays fair.

Weight decay applies only to tensors with ``dim() >= 2`` (conv/linear weights, embeddings): norm gains and
biases are never decayed, whatever the norm and whatever the optimizer (nanoGPT's rule).

``optim.name``:
* ``sgd``: ``torch.optim.SGD`` with ``optim.momentum`` (heavy ball), or Nesterov momentum with
  ``optim.nesterov=true`` (needs momentum > 0); weight decay is L2 (added to the gradient).
* ``adam``: ``torch.optim.Adam`` with ``optim.betas``; weight decay is L2 (added to the gradient, then scaled by
  Adam's per-parameter step: the coupled form AdamW was introduced to fix).
* ``adamw``: ``torch.optim.AdamW``; decoupled weight decay ``p *= 1 - lr * wd``.
* ``lion``: ``lion_pytorch.Lion`` (Chen et al. 2023, the optional extra ``.[lion]``; torch has no Lion); sign
  update with ``optim.betas`` and decoupled weight decay ``p *= 1 - lr * wd`` as in the paper.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "lion")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lion_class() -> type[torch.optim.Optimizer]:
    """``lion_pytorch.Lion``, or a ConfigError saying how to install it (the config check calls this too, so a
    missing package is refused before any data is read)."""
    try:
        from lion_pytorch import Lion
    except ImportError:
        raise ConfigError("optim.name='lion' needs the lion-pytorch package (torch has no Lion): "
                          "pip install 'normablate[lion]' (or: pip install lion-pytorch)") from None
    return Lion


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "adamw":
        # foreach: the multi-tensor step (CPU's default is a loop over tensors): same numbers bit for bit, 0.82-0.97x
        # the optimizer time at the LM/ViT study sizes (issue 29; fused=True measured 0.26-0.31x but not bitwise)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)
    if cfg.name == "lion":
        return lion_class()(groups, lr=cfg.lr, betas=cfg.betas)
    raise ConfigError(f"optim.name={cfg.name!r} is not allowed; valid: {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine / linear decay, constant, or step.

    ``step`` (multi-step decay, ``torch.optim.lr_scheduler.MultiStepLR``'s rule): ``gamma ** k`` where k counts the
    milestones already reached, a milestone f being step ``round(f * max_steps)`` (fractions, so the same spec means
    the same schedule at any budget, ``trainer.max_epochs`` included). Written as a factor of LambdaLR rather than
    MultiStepLR so that warmup and resume share the one scheduler every other schedule uses."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= round(m * max_steps) for m in cfg.milestones)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))
