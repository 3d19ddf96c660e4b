"""BatchNorm (``bn``) and Santurkar et al.'s noisy BatchNorm (``noisy_bn``).

``bn`` *is* PyTorch's BatchNorm (subclassing ``_BatchNorm``): same statistics, running-stat update
(``running = (1 - m) * running + m * batch``, m = 0.1, unbiased running_var) and kernels, so it matches
``nn.BatchNorm1d/2d`` exactly. For tokens ``(N, T, C)`` it normalizes each channel over N*T positions.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .sync import active as sync_active
from .sync import batch_norm as sync_batch_norm


def check_batch_size(x: torch.Tensor, channel_dim: int, training: bool) -> None:
    """Batch statistics need more than one value per channel; say so in plain words."""
    if training and x.numel() // max(x.shape[channel_dim], 1) <= 1:
        raise ValueError(
            f"BatchNorm in training mode needs more than one value per channel to compute batch statistics, "
            f"got input of shape {tuple(x.shape)} (one value per channel). Use a batch size > 1, "
            f"call model.eval(), or choose a batch-independent norm (ln, rms, gn)."
        )


@register("bn")
class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over every dim but the channel; eval uses running statistics."""

    is_normalization = True

    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 sync: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.layout = layout
        self.sync = bool(sync)  # pool batch statistics over data-parallel ranks in training (norms/sync.py)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2D input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        # Plain BN ignores the mask on purpose: padded tokens enter its statistics (that is the ablation).
        if self.layout == "tokens" and x.dim() > 2:
            # (N, T, C) -> (N*T, C): the same statistics as (N, C, T), but PyTorch's BN kernel for 2-D input reads
            # channels-last memory directly, where a transpose to (N, C, T) costs ~7x the norm itself on CPU.
            return self.batch_norm(x.reshape(-1, x.shape[-1])).view(x.shape)
        return self.batch_norm(x)  # (N, C, H, W) or (N, C)

    def batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm of channel-second ``x`` ((N, C) or (N, C, ...)): batch statistics and running-stat update in
        training, running statistics in eval (PyTorch's ``F.batch_norm``). The one place the statistics are
        computed, for a synchronized variant to replace."""
        if self.sync and self.training and sync_active():
            return sync_batch_norm(self, x, 1)  # statistics over every rank's batch (exact, differentiable)
        check_batch_size(x, 1, self.training or not self.track_running_stats)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}"


@register("noisy_bn")
class NoisyBatchNorm(BatchNorm):
    """BN followed by noise of non-zero mean and non-unit variance, redrawn at every training step.

    Santurkar et al. (2018, Sec. 2.1) inject such "distributional instability" after BN to show that a
    network trains about as well although each layer's input distribution keeps shifting. At every training
    step: ``y = bn(x) * s + m`` with ``s ~ U(1, noise_scale)`` and ``m ~ U(-noise_mean, noise_mean)``, drawn
    for each (sample, channel) (``per_sample: true``, the default, as the paper perturbs each activation of
    each sample) or once per channel for the whole batch (``per_sample: false``). Eval applies the expected
    transform ``y = bn(x) * E[s] + E[m] = bn(x) * (1 + noise_scale) / 2``, so the network evaluated is the
    one the later layers were trained against on average.
    """

    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, noise_mean: float = 0.5,
                 noise_scale: float = 1.5, per_sample: bool = True, sync: bool = False) -> None:
        super().__init__(num_features, layout=layout, eps=eps, momentum=momentum, affine=affine, sync=sync)
        if noise_scale < 1.0 or noise_mean < 0.0:
            raise ValueError(f"noisy_bn needs noise_scale >= 1 and noise_mean >= 0, got {noise_scale}, {noise_mean}")
        self.noise_mean, self.noise_scale, self.per_sample = noise_mean, noise_scale, per_sample
        self.noise_enabled = True  # switched off to measure batch-statistics loss without noise

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x, mask)
        if not self.training:
            return y * ((1.0 + self.noise_scale) / 2.0)
        if not self.noise_enabled:
            return y
        c_dim = 1 if self.layout == "image" else y.dim() - 1
        shape = [1] * y.dim()
        shape[c_dim] = y.shape[c_dim]
        if self.per_sample:
            shape[0] = y.shape[0]
        # One draw of U(0, 1) for scale and shift together, mapped to U(1, noise_scale) and U(-mean, mean); the
        # noise is applied in one fused pass (addcmul), not a multiply and an add over the activations.
        u = torch.rand((2, *shape), device=y.device, dtype=y.dtype)
        scale = u[0].mul_(self.noise_scale - 1.0).add_(1.0)
        shift = u[1].mul_(2.0 * self.noise_mean).sub_(self.noise_mean)
        return torch.addcmul(shift, y, scale)
