"""Masked BatchNorm (``masked_bn``): BatchNorm whose statistics use only real (unpadded) tokens.

For tokens ``(N, T, C)`` with ``mask (N, T)`` (True = real), the mean and variance of each channel are taken
over the real tokens alone, in the forward pass and in the running statistics, so the output on real tokens,
its gradients and the running stats equal ``nn.BatchNorm1d`` applied to ``x[mask]``. Padded positions output
zero and receive zero gradient. Eval uses the running statistics (unlike PowerNorm's reference code, whose
masked BN ignores them). A batch without any real token changes nothing and yields no NaN.

Written by hand because neither PyTorch nor timm has a masked BatchNorm. ``F.batch_norm`` on ``x[mask]`` would
do it, but boolean indexing syncs with the device and gathers and scatters every activation; composing the
masked statistics from autograd ops costs ~10 passes over the activations in the backward. So the training
forward is one ``autograd.Function`` (``_MaskedBatchNormFn``) with the textbook BN backward restricted to real
tokens (Ioffe & Szegedy 2015, Sec. 3), about as many passes over memory as PyTorch's own BN kernel:

    forward   xc = where(mask, x, 0) - mask * mean;   (where() done as a bitwise AND: ``zero_pads``)
              var = sum(xc^2) / n;  y = xc * (w * rstd) + mask * b
    backward  dy_k = where(mask, dy, 0);  db = sum dy_k;  dw = rstd * sum(dy_k * xc)
              dx = w * rstd * (dy_k - mask * db / n - xc * rstd^2 * sum(dy_k * xc) / n)
              (w * rstd * dy_k, dw and db come from one call of PyTorch's fused eval-mode BN backward kernel,
              ``native_batch_norm_backward`` on xc with mean 0 and variance var; the two masked terms are added.)

No host synchronisation: the real-token count stays a tensor; "exactly one real token" is checked with
``torch._assert_async`` and "no real token -> no running-stat update" is a zero interpolation weight. The
per-channel batch statistics are computed in one method, ``masked_moments``, for a synchronized variant.
"""
from __future__ import annotations

import torch

from . import register
from .batch import BatchNorm
from .sync import active as sync_active
from .sync import batch_norm as sync_batch_norm


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # fp16/bf16 -> fp32 stats


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                  torch.bfloat16: torch.int16}


def zero_pads(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` (M, C) with the rows where ``keep`` (M, 1) is False set to +0.0 exactly, real rows bit-identical
    (NaN and inf included): a bitwise AND with an all-ones/all-zeros row mask. Same result as
    ``torch.where(keep, x, 0)``, which PyTorch's CPU kernel runs 5-20x slower than a multiplication; a
    multiplication by the mask would turn an inf or NaN at a pad into NaN (0 * inf)."""
    int_type = _SAME_SIZE_INT[x.dtype]
    bits = keep.to(int_type).neg_()  # (M, 1): -1 (all bits set) at real tokens, 0 at pads
    return torch.bitwise_and(x.view(int_type), bits).view(x.dtype)


def masked_moments(x: torch.Tensor, keep: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred real tokens and their statistics, without autograd.

    x: (M, C) in the statistics dtype; keep: (M, 1) bool. Returns ``xc`` (M, C) = x - mean at real tokens and
    exactly 0 at pads (also where a pad holds inf/NaN: ``zero_pads``, not a product), ``mean`` and ``var`` (C,) the
    mean and biased variance over real tokens, ``n`` (0-dim) the number of real tokens. Two passes (mean, then centred squares)
    so that no ``E[x^2] - E[x]^2`` cancellation enters.
    """
    keep_f = keep.to(x.dtype)
    n = keep_f.sum()
    denom = n.clamp(min=1)
    xc = zero_pads(x, keep)  # (M, C)
    mean = xc.sum(0).div_(denom)  # (C,)
    xc.addcmul_(keep_f, mean, value=-1.0)  # pads stay exactly 0
    var = _sum_of_squares(xc).div_(denom)
    return xc, mean, var, n


def _sum_of_squares(xc: torch.Tensor) -> torch.Tensor:
    """Column sums of ``xc * xc`` (M, C) -> (C,) in one read of ``xc``, without the (M, C) product: the weight
    gradient of PyTorch's fused BN backward with grad = input = xc, mean 0 and invstd 1 is sum xc * (xc - 0) * 1.
    Measured at (8192, 384), threads 1: 1.6 ms against 2.9 ms for ``(xc * xc).sum(0)``."""
    if xc.shape[0] == 0 or torch.compiler.is_compiling():  # compiled: Inductor fuses the product into the sum
        return torch.mul(xc, xc).sum(0)
    zeros, ones = xc.new_zeros(xc.shape[1]), xc.new_ones(xc.shape[1])
    return torch.ops.aten.native_batch_norm_backward(xc, xc, None, None, None, zeros, ones, True, 0.0,
                                                     [False, True, False])[1]


class _MaskedBatchNormFn(torch.autograd.Function):
    """Batch-statistics masked BN of (M, C) tokens; returns (y, mean, var, n), only y differentiable."""

    @staticmethod
    def forward(ctx, x, keep, weight, bias, eps):  # noqa: ANN001
        acc = _acc_dtype(x)
        xc, mean, var, n = masked_moments(x.to(acc), keep)
        rstd = torch.rsqrt(var + eps)  # (C,)
        scale = rstd if weight is None else rstd * weight.to(acc)
        y = xc * scale
        keep_f = keep.to(acc)
        if bias is not None:
            y.addcmul_(keep_f, bias.to(acc))  # + b at real tokens; pads stay 0
        scale_w = torch.ones_like(rstd) if weight is None else weight.to(acc)  # (C,)
        ctx.save_for_backward(xc, keep, keep_f, rstd, scale, n, var, scale_w)
        ctx.eps = eps
        ctx.has_weight, ctx.has_bias, ctx.x_dtype = weight is not None, bias is not None, x.dtype
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *_):  # noqa: ANN001
        xc, keep, keep_f, rstd, scale, n, var, scale_w = ctx.saved_tensors
        eps = ctx.eps
        zeros = torch.zeros_like(var)
        denom = n.clamp(min=1)
        dyk = zero_pads(dy.to(xc.dtype), keep)  # (M, C): a pad's gradient never enters the sums
        # One fused PyTorch kernel (BN's eval-mode backward on xc, mean 0, variance var) gives three of the
        # passes: w * rstd * dyk, sum(dyk * xc) * rstd and sum(dyk), in ~2/3 of the time of three separate ops.
        dx, dxhat_sum, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dyk, xc, scale_w, zeros, var, None, None, False, eps,
            [ctx.needs_input_grad[0], True, True])  # dxhat_sum = sum(dyk * xc * rstd) (C,)
        dw = db = None
        if ctx.needs_input_grad[0]:
            dx.addcmul_(keep_f, scale * sum_dy / denom, value=-1.0)
            dx.addcmul_(xc, scale * rstd * dxhat_sum / denom, value=-1.0)
            dx = dx.to(ctx.x_dtype)
        if ctx.has_weight and ctx.needs_input_grad[2]:
            dw = dxhat_sum
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = sum_dy
        return dx, None, dw, db, None


@register("masked_bn")
class MaskedBatchNorm(BatchNorm):
    norm_label = "masked_bn"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or self.layout == "image":
            if mask is not None:
                raise ValueError("masked_bn: a mask is only meaningful for the tokens layout (N, T, C)")
            return super().forward(x)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"masked_bn: mask shape {tuple(mask.shape)} does not match tokens {tuple(x.shape[:2])}")
        shape = x.shape
        keep = mask.bool().reshape(-1, 1)  # (N*T, 1)
        x2 = x.reshape(-1, shape[-1])  # (N*T, C)
        if self.ghost_batch_size is not None and (self.training or not self.track_running_stats):
            return self.ghost_forward(x, mask)  # each group of sequences over its own real tokens (norms/batch.py)
        if self.training or not self.track_running_stats:
            y = self.masked_batch_norm(x2, keep)
        else:  # running statistics: one affine map per channel, pads -> 0
            acc = _acc_dtype(x)
            scale = torch.rsqrt(self.running_var.to(acc) + self.eps)
            shift = -self.running_mean.to(acc) * scale
            if self.affine:
                scale, shift = scale * self.weight, shift * self.weight + self.bias
            y = torch.where(keep, torch.addcmul(shift, x2.to(acc), scale), 0.0).to(x.dtype)
        return y.view(shape)

    def masked_batch_norm(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Batch-statistics forward of (M, C) tokens with keep (M, 1); updates the running statistics in
        training. The one place the statistics are computed, for a synchronized variant to replace."""
        if self.sync and self.training and sync_active():
            return sync_batch_norm(self, x, 1, keep)  # real tokens of every rank (exact, differentiable)
        if self.training:
            n = keep.sum()
            torch._assert_async(n != 1, "masked_bn in training mode needs more than one real token per channel "
                                        "to compute batch statistics; the batch holds exactly one real token.")
        y, mean, var, n = _MaskedBatchNormFn.apply(x, keep, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running(mean, var, n)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """PyTorch's update with the real tokens' batch, without a host sync: an empty batch (n = 0) gets weight 0
        (changes nothing, counts no batch)."""
        seen = (n > 0).to(self.num_batches_tracked.dtype)
        self.num_batches_tracked.add_(seen)
        if self.momentum is None:  # cumulative average: weight 1 / batches seen
            momentum = 1.0 / self.num_batches_tracked.clamp(min=1).to(mean.dtype)
        else:
            momentum = torch.full((), self.momentum, dtype=mean.dtype, device=mean.device)
        momentum = torch.where(n > 0, momentum, 0.0)
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum.to(self.running_mean.dtype))
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum.to(self.running_var.dtype))
