"""PreciseBN: BatchNorm running statistics recomputed as the exact population statistics of N training batches.

EMA running statistics lag the weights: they mix batches seen under older weights (the train/eval gap). Wu &
Johnson (2021, "Rethinking 'Batch' in BatchNorm") and fvcore's ``update_bn_stats`` replace them, before an
evaluation, by statistics of the *current* model over N training batches, with the model in training mode (each
BN's input is what it sees in training: earlier BNs normalize with batch statistics). Here, for every BN-family
layer (anything that is a ``_BatchNorm`` with running statistics: ``bn``, ``noisy_bn`` (noise off),
``masked_bn`` (real tokens only), ``batch_renorm``; PowerNorm keeps a different statistic and is left alone):

    running_mean = mean over all values of the N batches          (the population mean, not an average of EMAs)
    running_var  = M2 / (n - 1) over all values of the N batches  (the unbiased population variance)

Each batch contributes its count, sum and centred M2 (``norms.sync.local_moments``), pooled exactly (Chan et al.)
over batches and, under DDP, over ranks (one all-reduce per layer): the same statistics as one pass over the
concatenation of every rank's batches. fvcore instead averages the per-batch variances, which leaves out the
spread of the batch means; we take the exact population variance the issue asks for.

Ghost BN (``ghost_batch_size: k``): the forwards run in training mode, so every layer normalizes with its ghost
groups' statistics and each BN's input is what it sees in training; the statistics recomputed are still the
population mean and variance of that input over all the N batches (not an average of per-group statistics, which
is what the ghost EMA tracks). These are the statistics the eval forward (running statistics) should use to
match the population; they are not the per-group statistics the training forward normalized with, and the
difference between the two is part of what ``val/train_eval_gap_precise`` measures.

In a run (``trainer.precise_bn: N``), the callback recomputes the statistics before each validation from the N
most recent training batches (steps ``[s - N, s)``, or ``[0, N)`` early on; each rank its own slice), and the
task evaluates a third time with them swapped in: ``val/loss_precise`` (``val/acc_precise``, ``val/ppl_precise``)
and ``val/train_eval_gap_precise = val/loss_precise - val/loss_batchstats``, next to the EMA-based ``val/loss``
and ``val/train_eval_gap``. The EMA statistics are restored right after, so training (batch_renorm uses them),
checkpoints, resume and ``val/loss`` are exactly as without PreciseBN; no global RNG is drawn (batches are
functions of (seed, step), noise is off), so a run's trajectory does not change when PreciseBN is switched on.
Written by hand because fvcore's version is an EMA-free *average of batch variances*, knows no masks and
does not pool across ranks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from .norms import sync
from .norms.masked import MaskedBatchNorm

Stats = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]  # layer -> (population mean, unbiased var)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose running mean/var PreciseBN recomputes."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def _channels(m: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """Where ``m`` keeps its channels in ``x`` and which values enter its statistics."""
    tokens = getattr(m, "layout", "image") == "tokens" and x.dim() > 2
    keep = mask.bool()[..., None] if tokens and mask is not None and isinstance(m, MaskedBatchNorm) else None
    return (x.dim() - 1 if tokens else 1), keep


@contextlib.contextmanager
def _train_mode_untouched(layers: list[nn.Module]) -> Iterator[None]:
    """BN layers in training mode (batch statistics), noise off; modes and buffers restored afterwards."""
    saved = [(m, m.training, {k: b.clone() for k, b in m.named_buffers(recurse=False)},
              getattr(m, "noise_enabled", None), getattr(m, "allow_partial_ghost_group", None)) for m in layers]
    try:
        for m in layers:
            m.train()
            if hasattr(m, "noise_enabled"):
                m.noise_enabled = False
            if hasattr(m, "allow_partial_ghost_group"):
                m.allow_partial_ghost_group = True  # ghost BN on a batch of any size (the last group smaller)
        yield
    finally:
        for m, training, buffers, noise, partial in saved:
            m.train(training)
            if partial is not None:
                m.allow_partial_ghost_group = partial
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
            if noise is not None:
                m.noise_enabled = noise


@torch.no_grad()
def population_stats(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> Stats:
    """Population mean and unbiased variance of every BN layer's input over ``batches`` (and all ranks).

    ``forward(batch)`` runs the model on one batch (e.g. ``task.loss``). Running buffers are left as they were."""
    layers = bn_layers(model)
    parts: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {m: [] for m in layers}

    def hook(m, args, kwargs):  # noqa: ANN001
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        c_dim, keep = _channels(m, x, mask)
        parts[m].append(sync.local_moments(x, c_dim, keep))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        with _train_mode_untouched(layers):
            for batch in batches:
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    out: Stats = {}
    for m in layers:
        if not parts[m]:
            continue  # a layer the batches never reached keeps its statistics
        n, s, m2 = (torch.stack(t) for t in zip(*parts[m]))
        mean, var, total = sync.combine(n, s, m2)
        if sync.active():  # pool over ranks: each rank's (N, sum, M2) in its own row of one all-reduce
            w, rank = dist.get_world_size(), dist.get_rank()
            row = torch.cat([total[None], mean * total, var * total])
            table = torch.zeros(w, row.numel(), dtype=row.dtype, device=row.device)
            table[rank] = row
            dist.all_reduce(table)
            c = mean.numel()
            mean, var, total = sync.combine(table[:, 0], table[:, 1:1 + c], table[:, 1 + c:])
        if float(total) > 1:
            var = var * (total / (total - 1))
        out[m] = (mean, var)
    return out


@contextlib.contextmanager
def swapped(stats: Stats) -> Iterator[None]:
    """Evaluate with ``stats`` as the running statistics; the original buffers are restored on exit."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone()) for m in stats]
    try:
        for m, (mean, var) in stats.items():
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
        yield
    finally:
        for m, mean, var in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


def recent_steps(step: int, num_batches: int) -> range:
    """The training steps whose batches recalibrate at global step ``step``: the N most recent (or the first N)."""
    start = max(0, step - num_batches)
    return range(start, start + num_batches)


class PreciseBN(L.Callback):
    """Before each validation (and the end-of-run test pass that measures the train/eval gap), compute PreciseBN
    statistics and hand them to the task (``precise_stats``), which evaluates with them swapped in as
    ``val_precise``; dropped again after the validation."""

    def __init__(self, num_batches: int) -> None:
        if num_batches < 1:
            raise ValueError(f"PreciseBN needs at least one batch, got {num_batches}")
        self.num_batches = num_batches

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not bn_layers(pl_module):
            return
        dm = trainer.datamodule
        device = pl_module.device
        batches = (dm.rank_train_batch(s, device) for s in recent_steps(trainer.global_step, self.num_batches))
        pl_module.precise_stats = population_stats(pl_module, batches, pl_module.loss)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.precise_stats = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The end-of-run test pass that measures the train/eval gap (``test_gap``) measures it after PreciseBN
        too, with statistics recomputed as before a validation (from the most recent training batches)."""
        if getattr(pl_module, "test_gap", False):
            self.on_validation_epoch_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.precise_stats = None
