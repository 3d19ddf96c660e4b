"""Batch statistics synchronized across data-parallel ranks, exact also with padding masks, CPU and GPU.

A BatchNorm under data parallelism normalizes with its own rank's batch unless its statistics are pooled over
all ranks. ``moments(x, channel_dim, keep)`` returns the per-channel mean and (biased) variance of the values
of ``x`` where ``keep`` is True, pooled over every rank of the process group, and the pooled count:

    per rank r: n_r (real values per channel), s_r = sum x, M2_r = sum (x - s_r/n_r)^2    (centred, stable)
    one all-reduce of the stacked (W, 1 + 2C) table  (each rank fills its own row, zeros elsewhere)
    N = sum n_r;  mean = sum s_r / N;  var = (sum M2_r + sum n_r (s_r/n_r - mean)^2) / N      (Chan et al.)

Counts travel with the sums, so ranks holding different amounts of padding (or different batch sizes) give
exactly the statistics of one process on the concatenated real values. Centred second moments avoid the
cancellation of ``E[x^2] - E[x]^2``. The all-reduce is differentiable: its backward all-reduces the incoming
gradient (sum), so the gradient reaching each rank's input and parameters is that of the sum of all ranks'
losses, as on the concatenated batch (what PyTorch's ``SyncBatchNorm`` does in its backward).

Written by hand because PyTorch's ``SyncBatchNorm`` runs only on CUDA and knows no masks, and the
autograd-aware ``torch.distributed.nn.functional.all_reduce`` is deprecated; the collective itself is
``torch.distributed.all_reduce`` (gloo on CPU, NCCL on GPU). Outside a process group of size > 1 everything
here is the local computation, so ``sync: true`` on one process equals plain BN.

``batch_norm(bn, x, channel_dim, keep)`` is the synchronized training forward of a ``_BatchNorm``-like module
(its ``weight``, ``bias``, ``eps``, ``momentum`` and running buffers), running statistics updated with the
pooled unbiased variance exactly as PyTorch updates them. BN-family norms call it when their ``sync`` option is
on; ``enable(model)`` turns it on at every norm site (the run-level ``trainer.sync_batchnorm`` switch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def active(group=None) -> bool:
    """Whether statistics have anything to be synchronized with."""
    return world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks (d(sum_r L_r)/dx_r)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-reduce (sum) of ``x`` over ``group``; ``x`` itself outside a group of size > 1."""
    return _AllReduceSum.apply(x, group) if active(group) else x


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # fp16/bf16 -> fp32 stats


def local_moments(x: torch.Tensor, channel_dim: int, keep: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(n, sum, M2)``: count of kept values per channel (0-dim), per-channel sum and centred sum of
    squares (C,), over every dim of ``x`` but ``channel_dim``. ``keep`` broadcasts to ``x`` (True = counts)."""
    xf = x.to(_stat_dtype(x))
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    if keep is None:
        n = torch.tensor(float(x.numel() // max(x.shape[channel_dim], 1)), dtype=xf.dtype, device=x.device)
        s = xf.sum(dim=dims)
        m = s / n.clamp(min=1)
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        xc = xf - m.view(shape)
        return n, s, (xc * xc).sum(dim=dims)
    keep = keep.bool()
    # count per channel = kept positions (keep has size 1 along the channel dim, or is full-size and equal per C)
    full = keep.expand_as(x)
    n = full.sum(dtype=torch.int64).to(xf.dtype) / x.shape[channel_dim]
    xz = torch.where(full, xf, 0.0)  # where(), not *: a non-finite value at a pad must not leak in
    s = xz.sum(dim=dims)
    m = s / n.clamp(min=1)
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    xc = torch.where(full, xf - m.view(shape), 0.0)
    return n, s, (xc * xc).sum(dim=dims)


def combine(n: torch.Tensor, s: torch.Tensor, m2: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool per-part moments: ``n`` (K,), ``s`` (K, C), ``m2`` (K, C) -> ``(mean (C,), biased var (C,), N)``."""
    total = n.sum()
    denom = total.clamp(min=1)
    mean = s.sum(0) / denom
    part_mean = s / n.clamp(min=1)[:, None]
    between = (n[:, None] * (part_mean - mean) ** 2).sum(0)  # zero for empty parts (n = 0)
    return mean, (m2.sum(0) + between) / denom, total


def moments(x: torch.Tensor, channel_dim: int, keep: torch.Tensor | None = None, group=None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every rank's kept values, and their count N (0-dim).

    x: any shape with channels on ``channel_dim``; keep: bool, broadcastable to x (e.g. (N, T, 1) for tokens).
    Differentiable in x (also through the other ranks' use of the pooled statistics)."""
    n, s, m2 = local_moments(x, channel_dim, keep)
    w = world_size(group)
    if w == 1:
        return combine(n[None], s[None], m2[None])
    rank = dist.get_rank(group)
    row = torch.cat([n[None], s, m2])  # (1 + 2C,)
    rows = [row if r == rank else torch.zeros_like(row) for r in range(w)]
    table = all_reduce_sum(torch.stack(rows), group)  # (W, 1 + 2C): every rank's row
    c = s.shape[0]
    mean, var, total = combine(table[:, 0], table[:, 1:1 + c], table[:, 1 + c:])
    return mean, var, total.detach()


@torch.no_grad()
def update_running(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
    """PyTorch's running-statistics update with the pooled batch: unbiased var, momentum or cumulative average."""
    if not getattr(bn, "track_running_stats", False) or float(n) == 0:
        return
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var * (n / (n - 1)) if float(n) > 1 else var
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


def batch_norm(bn: nn.Module, x: torch.Tensor, channel_dim: int, keep: torch.Tensor | None = None,
               group=None) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` with statistics pooled over every rank (and over ``keep`` only).

    Updates ``bn``'s running statistics with the pooled batch; positions outside ``keep`` output 0."""
    mean, var, n = moments(x, channel_dim, keep, group)
    if float(n) == 1:
        raise ValueError("synchronized BatchNorm in training mode needs more than one value per channel over all "
                         "ranks to compute batch statistics; the ranks hold exactly one together")
    if bn.training:
        update_running(bn, mean.detach(), var.detach(), n.detach())
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    xf = x.to(mean.dtype)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if keep is not None:
        y = torch.where(keep.bool(), y, 0.0)
    return y.to(x.dtype)


def supports_sync(module: nn.Module) -> bool:
    """A BN-family norm that can synchronize has a bool attribute ``sync`` (the contract of this module)."""
    return isinstance(getattr(module, "sync", None), bool)


def enable(model: nn.Module) -> int:
    """Turn on ``sync`` at every norm site that supports it; returns how many. Raises ``ValueError`` naming a
    batch-statistics layer (a ``_BatchNorm``) that cannot synchronize, rather than silently leaving it local, or
    one with ghost groups (``ghost_batch_size``), which are per-rank by definition."""
    count = 0
    for name, m in model.named_modules():
        if getattr(m, "ghost_batch_size", None) is not None:
            raise ValueError(f"layer {name!r} ({type(m).__name__}) has ghost_batch_size={m.ghost_batch_size}: ghost "
                             f"groups are parts of one rank's batch and cannot be synchronized across ranks")
        if supports_sync(m):
            m.sync = True
            count += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"layer {name!r} ({type(m).__name__}) keeps batch statistics but has no 'sync' "
                             f"option; it cannot be synchronized across ranks")
    return count


__all__ = ["active", "all_reduce_sum", "batch_norm", "combine", "enable", "local_moments", "moments",
           "supports_sync", "update_running", "world_size"]
