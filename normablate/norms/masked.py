"""Masked BatchNorm (``masked_bn``): BatchNorm whose statistics use only real (unpadded) tokens.

For tokens ``(N, T, C)`` with ``mask (N, T)`` (True = real), the mean and variance of each channel are taken
over the real tokens alone, in the forward pass and in the running statistics, so the output on real tokens,
its gradients and the running stats equal ``nn.BatchNorm1d`` applied to ``x[mask]``. Padded positions output
zero and receive zero gradient. Eval uses the running statistics (unlike PowerNorm's reference code, whose
masked BN ignores them). A batch without any real token changes nothing and yields no NaN.

Written by hand because neither PyTorch nor timm has a masked BatchNorm; ``F.batch_norm`` on ``x[mask]`` would
do it, but boolean indexing syncs with the device and reallocates, so we use masked sums instead.
"""
from __future__ import annotations

import torch

from . import register
from .batch import BatchNorm


@register("masked_bn")
class MaskedBatchNorm(BatchNorm):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or self.layout == "image":
            if mask is not None:
                raise ValueError("masked_bn: a mask is only meaningful for the tokens layout (N, T, C)")
            return super().forward(x)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"masked_bn: mask shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}")
        keep = mask.bool().unsqueeze(-1)  # (N, T, 1)
        # where(), not multiplication: 0 * inf = NaN, so a non-finite value at a pad would leak into the stats.
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # fp16/bf16 -> fp32 stats
        xf = torch.where(keep, x.to(acc), 0.0)  # (as PyTorch's BN computes statistics under autocast)
        n = keep.sum().to(xf.dtype)
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            if self.training and n.item() == 1:
                raise ValueError(
                    "masked_bn in training mode needs more than one real token per channel to compute batch "
                    "statistics; the batch holds exactly one real token."
                )
            denom = n.clamp(min=1)
            mean = xf.sum(dim=(0, 1)) / denom  # (C,)
            xc = torch.where(keep, xf - mean, 0.0)
            var = (xc * xc).sum(dim=(0, 1)) / denom  # biased, used to normalize (as PyTorch)
            if self.training and self.track_running_stats and n.item() > 0:
                self._update_running(mean.detach(), var.detach(), n.detach())
        else:
            mean, var = self.running_mean, self.running_var
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return torch.where(keep, y, 0.0).to(x.dtype)  # padded positions -> 0

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1) if n > 1 else var
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
