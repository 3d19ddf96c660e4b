"""Batch Renormalization (``batch_renorm``, Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models").

Training, per channel, with batch mean/std ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (biased var, as BN) and
running ``mu``, ``sigma = sqrt(running_var + eps)``::

    r = clip(sigma_B / sigma, 1/r_max, r_max)        # no gradient through r
    d = clip((mu_B - mu) / sigma, -d_max, d_max)     # no gradient through d
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

Gradients do flow through ``mu_B`` and ``sigma_B``, as in BN. With r_max = 1 and d_max = 0, r = 1 and d = 0
and the layer is BatchNorm (outputs, gradients and running statistics equal ``nn.BatchNorm``, tested). Eval
uses the running statistics, as BN. Running statistics follow PyTorch's BN convention (the rest of this
package and ``nn.BatchNorm``): ``running = (1 - m) * running + m * batch`` with the unbiased batch variance;
the paper writes the update on sigma itself (``sigma += m * (sigma_B - sigma)``). This is the one deliberate
difference, so that r_max = 1, d_max = 0 is exactly ``bn``.

Warm-up schedule. The paper's experiments (Sec. 5.1) keep r_max = 1, d_max = 0 for the first 5k steps and then
relax them gradually, to r_max = 3 at 40k steps and d_max = 5 at 25k steps. Here, with s = the number of
training forwards done before this one (buffer ``renorm_step``, saved in ``state_dict`` so a resumed run
continues exactly),

    r_max(s) = 1 + (r_max - 1) * clamp((s - warmup_steps) / (r_max_steps - warmup_steps), 0, 1)
    d_max(s) =      d_max      * clamp((s - warmup_steps) / (d_max_steps - warmup_steps), 0, 1)

(linear relaxation; the paper says "gradually" without giving the curve). Defaults are the paper's
(5000 / 40000 / 25000 steps): in a short run the layer is plain BN throughout, so scale the steps to the run.
``warmup_steps = r_max_steps = d_max_steps = 0`` gives constant limits from the first step.

Padding (tokens ``(N, T, C)`` with ``mask (N, T)``, True = real): by default the mask is ignored, as ``bn``
ignores it (padded positions enter the batch statistics). ``masked: true`` takes the batch statistics over the
real tokens only, as ``masked_bn`` does: ``mu_B``, ``sigma_B`` and the running-stat update (with the real-token
count) use real tokens, padded positions output 0 and get no gradient (also when they hold inf/NaN), a batch
without a real token changes nothing (no running-stat update, no step counted) and one with exactly one real token
is an error. On the real tokens it equals ``batch_renorm`` applied to ``x[mask]`` (tested). Eval: running
statistics, pads output 0. That path is composed from autograd ops (the fused kernel below knows no mask).

Written by hand: neither PyTorch nor timm has batch renormalization. Subclasses our ``BatchNorm`` (so the
running buffers, eval path, layouts and every ``_BatchNorm`` check - conv bias, train/eval gap - carry over);
the batch statistics are computed in one method, ``batch_stats``, for a synchronized variant to override.

Speed: with r and d constants the training step is BN with the affine (gamma * r, gamma * d + beta), so the
training forward/backward run as one ``autograd.Function`` (``_RenormFn``) on PyTorch's BN kernels, with BN's
passes over the activations (the composed ops measured 4x/9x ``nn.BatchNorm``). Synchronized statistics and
non-contiguous or fp16/bf16 input keep the composed formula below (same numbers, tested).
torch.compile: the training forward runs eagerly (``torch.compiler.disable``; a graph break around each
batch_renorm layer). Compiled, AOTAutograd's backward recomputes r and d from the graph's inputs, the running
buffers, after their in-place update in the same step, and the input/weight gradients came out wrong (by ~3e-2
and ~1e-1 on a (4, 8, 5, 5) batch, torch 2.14.1 CPU; the outputs were right; an out-of-place update fixed it but
would hand DDP's buffer broadcast stale tensors). Tested: compiled and eager gradients agree.
"""
from __future__ import annotations

import torch

from . import register
from .batch import BatchNorm, _image_moments, check_batch_size
from .sync import active as sync_active
from .sync import moments as sync_moments


# torch.compiler.disable, but importing torch._dynamo on the first call instead of at import (seconds that config
# checks, `normablate list` and a sweep's supervising process never need); PyTorch's own lazy form where present.
_eager_under_compile = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


@register("batch_renorm")
class BatchRenorm(BatchNorm):
    norm_label = "batch_renorm"

    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 5000, r_max_steps: int = 40000, d_max_steps: int = 25000,
                 sync: bool = False, masked: bool = False) -> None:
        if not r_max >= 1.0:
            raise ValueError(f"batch_renorm: r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if not d_max >= 0.0:
            raise ValueError(f"batch_renorm: d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        if warmup_steps < 0:
            raise ValueError(f"batch_renorm: warmup_steps must be >= 0, got {warmup_steps}")
        for key, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if end < warmup_steps:
                raise ValueError(f"batch_renorm: {key}={end} must be >= warmup_steps={warmup_steps} "
                                 f"(the step at which the limit is fully relaxed)")
        super().__init__(num_features, layout=layout, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, sync=sync)
        self.masked = bool(masked)  # statistics over real tokens only (module doc); False: the mask is ignored
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = int(warmup_steps), int(r_max_steps), int(d_max_steps)
        self.register_buffer("renorm_step", torch.zeros((), dtype=torch.long))  # training forwards so far

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) for the current step, as 0-dim tensors on the buffers' device (no host sync)."""
        s = self.renorm_step.to(torch.float64)

        def relaxed(end_step: int) -> torch.Tensor:
            if end_step <= self.warmup_steps:
                return (s >= self.warmup_steps).to(torch.float64)
            return ((s - self.warmup_steps) / (end_step - self.warmup_steps)).clamp(0.0, 1.0)

        return 1.0 + (self.r_max - 1.0) * relaxed(self.r_max_steps), self.d_max * relaxed(self.d_max_steps)

    def batch_stats(self, x: torch.Tensor, c_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel batch mean and biased variance over every dim but ``c_dim`` (with gradient), and the
        number of values per channel (with ``sync`` under DDP: pooled over every rank, norms/sync.py)."""
        if self.sync and sync_active():
            mean, var, n = sync_moments(x, c_dim)
            return mean, var, float(n)
        var, mean = torch.var_mean(x, dim=tuple(d for d in range(x.dim()) if d != c_dim), unbiased=False)
        return mean, var, x.numel() // x.shape[c_dim]

    def corrections(self, mean: torch.Tensor, std: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max), no gradient."""
        with torch.no_grad():
            r_max, d_max = self.limits()
            running_std = torch.sqrt(self.running_var.to(acc) + self.eps)
            r = (std / running_std).clamp(1.0 / r_max.to(acc), r_max.to(acc))
            d = ((mean - self.running_mean.to(acc)) / running_std).clamp(-d_max.to(acc), d_max.to(acc))
        return r, d

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = self._keep(x, mask) if self.masked and mask is not None else None
        if not self.training:
            y = super().forward(x, mask)  # BN with running statistics
            return y if keep is None else torch.where(keep, y, 0.0)  # masked: pads output 0
        if keep is not None:
            return self._masked_train_forward(x, keep)
        return self._train_forward(x)

    def _keep(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask as (N, T, 1) bool, checked against tokens (N, T, C)."""
        if self.layout != "tokens" or x.dim() != 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"batch_renorm (masked): a mask (N, T) needs tokens (N, T, C) in the tokens layout; got "
                             f"mask {tuple(mask.shape)} for input {tuple(x.shape)} in layout {self.layout!r}")
        return mask.bool().unsqueeze(-1)

    @_eager_under_compile  # as _train_forward
    def _masked_train_forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Training forward with statistics over the real tokens only (``keep`` (N, T, 1)); composed autograd ops."""
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        xf = torch.where(keep, x.to(acc), 0.0)  # where(), not *: a pad's inf/NaN must not leak (0 * inf = NaN)
        keep_f = keep.to(acc)
        if self.sync and sync_active():
            mean, var, n = sync_moments(xf, 2, keep)  # real tokens of every rank
        else:
            n = keep_f.sum()
            mean = xf.sum(dim=(0, 1)) / n.clamp(min=1)  # (C,)
            xc0 = xf - mean * keep_f
            var = (xc0 * xc0).sum(dim=(0, 1)) / n.clamp(min=1)
        torch._assert_async(n != 1, "batch_renorm (masked) in training mode needs more than one real token per "
                                    "channel to compute batch statistics; the batch holds exactly one")
        std = torch.sqrt(var + self.eps)
        r, d = self.corrections(mean, std, acc)
        y = (xf - mean) / std * r + d
        if self.affine:
            y = y * self.weight + self.bias
        self._update_running_masked(mean.detach(), var.detach(), n.detach())
        return torch.where(keep, y, 0.0).to(x.dtype)

    @torch.no_grad()
    def _update_running_masked(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """``_update_running`` with the real-token count as a tensor (no host sync); n = 0 changes nothing."""
        seen = n > 0
        self.renorm_step.add_(seen.to(self.renorm_step.dtype))
        self.num_batches_tracked.add_(seen.to(self.num_batches_tracked.dtype))
        if self.momentum is None:
            momentum = 1.0 / self.num_batches_tracked.clamp(min=1).to(mean.dtype)
        else:
            momentum = torch.full((), self.momentum, dtype=mean.dtype, device=mean.device)
        momentum = torch.where(seen, momentum, 0.0)
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum.to(self.running_mean.dtype))
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum.to(self.running_var.dtype))

    @_eager_under_compile  # see the module docstring (wrong compiled gradients)
    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        # image (N, C, H, W) and pooled (N, C): channel dim 1; tokens (N, T, C): channel last
        c_dim = x.dim() - 1 if self.layout == "tokens" and x.dim() > 2 else 1
        shape = [1] * x.dim()
        shape[c_dim] = -1
        check_batch_size(x, c_dim, True)
        if self._fused_ok(x):
            return self._fused_forward(x, c_dim)
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # fp16/bf16: fp32 stats
        xf = x.to(acc)
        mean, var, n = self.batch_stats(xf, c_dim)  # (C,), (C,)
        std = torch.sqrt(var + self.eps)
        r, d = self.corrections(mean, std, acc)
        y = (xf - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        self._update_running(mean.detach(), var.detach(), n)
        return y.to(x.dtype)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """Whether the training forward can take ``_RenormFn``: fp32/fp64 contiguous input with parameters and
        buffers of its dtype, not synchronized over ranks (``batch_stats`` pools them)."""
        if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.numel() == 0:
            return False
        if self.running_var.dtype != x.dtype or (self.affine and self.weight.dtype != x.dtype):
            return False
        return not (self.sync and sync_active())

    def _fused_forward(self, x: torch.Tensor, c_dim: int) -> torch.Tensor:
        c = x.shape[c_dim]
        x2 = x.view(-1, c) if c_dim == x.dim() - 1 and x.dim() > 2 else x.view(x.shape[0], c, -1)
        r_max, d_max = self.limits()
        y, mean, var = _RenormFn.apply(x2, self.weight, self.bias, self.running_mean, self.running_var,
                                       r_max.to(x.dtype), d_max.to(x.dtype), self.eps, x2.dim() == 3)
        self._update_running(mean, var, x2.numel() // c)
        return y.view(x.shape)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        self.renorm_step.add_(1)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps="
                f"{self.warmup_steps}, r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
                + (", masked=True" if self.masked else ""))


class _RenormFn(torch.autograd.Function):
    """The training forward and backward of batch renormalization with BN's passes over the activations.

    With r and d constants (no gradient), ``gamma * ((x - mu_B) / sigma_B * r + d) + beta`` is BatchNorm with the
    affine ``gamma' = gamma * r``, ``beta' = gamma * d + beta``. So: the batch statistics (PyTorch's kernel for
    tokens (M, C), ``_image_moments`` for images (N, C, S)), then PyTorch's eval-mode BN kernel with the batch
    statistics in place of the running ones (one elementwise pass, ``x * alpha + beta`` exactly as in BN), and in
    the backward PyTorch's fused training-mode BN backward with ``gamma'``, the batch mean and rstd:
    ``dx`` as BN's (gradient through mu_B and sigma_B), ``dgamma = r * sum(g xhat) + d * sum(g)``,
    ``dbeta = sum(g)``. The composed autograd version (var_mean, sub, div, mul, add and their backwards) measured
    4x (image) and 9x (tokens) nn.BatchNorm. Returns (y, mean, var); mean and var (biased) carry no gradient and
    feed the module's running-stat update."""

    @staticmethod
    def forward(ctx, x2, weight, bias, running_mean, running_var, r_max, d_max, eps, image):  # noqa: ANN001
        mean, var = _image_moments(x2) if image else torch.batch_norm_update_stats(x2, None, None, 0.0)
        std = torch.sqrt(var + eps)
        running_std = torch.sqrt(running_var + eps)
        r = (std / running_std).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean) / running_std).clamp(-d_max, d_max)
        w_eff = r if weight is None else weight * r
        b_eff = d if weight is None else weight * d
        if bias is not None:
            b_eff = b_eff + bias
        y = torch.batch_norm(x2, w_eff, b_eff, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x2, w_eff, mean, torch.rsqrt(var + eps), r, d)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, *_):  # noqa: ANN001
        x2, w_eff, mean, rstd, r, d = ctx.saved_tensors
        dx, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(), x2, w_eff, None, None, mean, rstd, True, 0.0,
            [ctx.needs_input_grad[0], ctx.has_weight, ctx.has_weight or ctx.has_bias])
        dw = torch.addcmul(r * g_xhat, d, g_sum) if ctx.has_weight else None
        db = g_sum if ctx.has_bias else None
        return (dx, dw, db) + (None,) * 6
