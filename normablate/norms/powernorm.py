"""PowerNorm (``powernorm``): Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization
in Transformers" (ICML 2020), Algorithm 1, masked over padding.

Per channel, with the batch quadratic mean ``psi_B^2 = mean(x^2)`` over the real tokens (no mean subtraction:
the "relaxed zero-mean"), a running quadratic mean ``psi^2`` (buffer ``running_phi``, init 1) and a running
gradient statistic ``nu`` (buffer ``running_nu``, init 0)::

    forward:   z = x / psi_{t-1};   y = gamma * z + beta;   psi_t^2 = a_f * psi_{t-1}^2 + (1 - a_f) * psi_B^2
    backward:  g = gamma * dL/dy;   g' = g - nu_{t-1} * z;   dL/dx = g' / psi_{t-1}
               nu_t = nu_{t-1} + (1 - a_b) * mean(g' * z)   (= nu (1 - (1 - a_b) Gamma) + (1 - a_b) Lambda)
    inference: y = gamma * x / psi_T + beta

(``psi = sqrt(psi^2 + eps)``; ``a_f = alpha_fwd``, ``a_b = alpha_bkw``, 0.9 each as in the paper.) The
running statistics are used in the forward pass of training too; the approximate backward (a
``torch.autograd.Function``) replaces the gradient through the statistics by the running ``nu`` correction.

Warm-up (the authors' code; Algorithm 1 has none): during the first ``warmup_iters`` training steps the
forward (and the backward's division) uses the batch ``psi_B`` instead of ``psi_{t-1}``, and during the first
``warmup_iters - 1`` steps ``running_phi`` is first replaced by the cumulative average of the batch values
seen so far and then takes the EMA step above (so its initial value 1 is forgotten at once). The authors pass
their learning-rate warm-up length; the default here is 1000 (their function's default); set it to
``optim.warmup_steps`` to mirror their setting, or 0 for Algorithm 1 from the first step.

``group_scaling: G`` (default off) first divides each token by the root mean square of each of G channel
groups (no statistics across tokens), as the authors' code does before PowerNorm (they use G = number of
heads; described in the paper's appendix as a stabilizer for LM/MT). Off by default so that ``powernorm`` is
the paper's Algorithm 1, a pure batch-statistics norm; turn it on to reproduce their setting. As in their
``GroupScaling1D`` (which PowerNorm builds with its default ``eps=1e-5``, whatever PowerNorm's own eps), the group
RMS is ``sqrt(mean(x^2) + 1e-5)`` with a fixed 1e-5 (``GROUP_SCALING_EPS``), not the norm's ``eps``: the two
agree at the default eps 1e-5 and differ only when ``eps`` is changed.

Masking (tokens ``(N, T, C)``, ``mask (N, T)`` True = real): ``psi_B^2`` and the backward's mean use the real
tokens only; padded positions output 0 and receive no gradient; a batch with no real token changes nothing.

Differences from the reference code (github.com/sIncerass/powernorm, ``mask_powernorm.py``), on purpose:
after warm-up its backward divides by the *batch* ``psi_B`` although its forward divides by ``psi_{t-1}``; we
divide by ``psi_{t-1}``, the paper's Algorithm 1 and the exact derivative of the forward. Its gradient EMA
(``ema_gz``) is the paper's ``nu / (1 - a_b)``; we store ``nu``. Its ``nu`` update averages over padded
positions too; ours over real tokens only. In agreement with it: the group scaling's eps is its fixed 1e-5, not
the norm's ``eps``. Everything else (forward, running statistics with warm-up, the
backward during warm-up and the parameter gradients) matches it numerically: tests/norms/test_norm_families.py.

Written by hand: no library implements PowerNorm. Layouts: tokens ``(..., C)`` (statistics over every dim but
the last), image ``(N, C, H, W)`` (over N, H, W). Statistics are computed in fp32 for fp16/bf16 inputs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register

GROUP_SCALING_EPS = 1e-5  # the authors' GroupScaling1D default, fixed: independent of the norm's eps


class _PowerNormalize(torch.autograd.Function):
    """z = x * inv_psi, with the approximate backward of Algorithm 1 (updates ``nu`` in place)."""

    @staticmethod
    def forward(ctx, x, inv_psi, nu, alpha_bkw, n, c_dim):  # noqa: ANN001
        z = x * inv_psi  # x is 0 at padded positions, so z is too
        ctx.save_for_backward(z, inv_psi, n)
        ctx.nu, ctx.alpha_bkw, ctx.c_dim = nu, alpha_bkw, c_dim
        return z

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001  g = dL/dz = gamma * dL/dy (0 at padded positions)
        z, inv_psi, n = ctx.saved_tensors
        shape = [1] * z.dim()
        shape[ctx.c_dim] = -1
        nu = ctx.nu.view(shape)
        g_approx = g - nu.to(g.dtype) * z  # the intermediate gradient g'
        with torch.no_grad():
            dims = tuple(d for d in range(z.dim()) if d != ctx.c_dim)
            step = (g_approx * z).sum(dims) / n.clamp(min=1).to(z.dtype)  # mean over real tokens
            ctx.nu.add_(((1.0 - ctx.alpha_bkw) * step * (n > 0)).to(ctx.nu.dtype))
        return g_approx * inv_psi, None, None, None, None, None


@register("powernorm")
class PowerNorm(nn.Module):
    is_normalization = True

    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5, alpha_fwd: float = 0.9,
                 alpha_bkw: float = 0.9, affine: bool = True, warmup_iters: int = 1000,
                 group_scaling: int | None = None) -> None:
        super().__init__()
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"powernorm: eps must be > 0, got {eps}")
        for key, a in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= a < 1.0:
                raise ValueError(f"powernorm: {key} must be in [0, 1) (the old value's weight), got {a}")
        if int(warmup_iters) != warmup_iters or warmup_iters < 0:
            raise ValueError(f"powernorm: warmup_iters must be an integer >= 0, got {warmup_iters}")
        if group_scaling is not None and (int(group_scaling) != group_scaling or group_scaling < 1
                                          or num_features % group_scaling):
            raise ValueError(f"powernorm: group_scaling must be null or a number of groups >= 1 dividing "
                             f"num_features={num_features}, got {group_scaling}")
        self.num_features, self.layout, self.eps = num_features, layout, float(eps)
        self.alpha_fwd, self.alpha_bkw, self.warmup_iters = float(alpha_fwd), float(alpha_bkw), int(warmup_iters)
        self.group_scaling = None if group_scaling is None else int(group_scaling)
        self.affine = affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_phi", torch.ones(num_features))  # psi^2
        self.register_buffer("running_nu", torch.zeros(num_features))  # nu
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))  # training steps with a real token

    def _group_scale(self, x: torch.Tensor, c_dim: int) -> torch.Tensor:
        """Divide each token by the RMS of each of G channel groups (per token, no cross-token statistics), with
        the authors' fixed ``GROUP_SCALING_EPS`` inside the root (not ``self.eps``; see the module doc)."""
        xc = x.movedim(c_dim, -1)
        xg = xc.reshape(*xc.shape[:-1], self.group_scaling, -1)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + GROUP_SCALING_EPS)
        return xg.reshape(xc.shape).movedim(-1, c_dim)

    def batch_stats(self, x: torch.Tensor, c_dim: int, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch quadratic mean psi_B^2 per channel over the real positions (``x`` is 0 at pads), and their
        count as a 0-dim tensor. The one place a synchronized variant needs to all-reduce (sums and count)."""
        dims = tuple(d for d in range(x.dim()) if d != c_dim)
        if keep is None:
            n = torch.tensor(x.numel() // x.shape[c_dim], device=x.device)
        else:
            n = keep.sum()
        return x.pow(2).sum(dims) / n.clamp(min=1).to(x.dtype), n

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # image (N, C, H, W): channel dim 1; tokens (..., C): channel last
        c_dim = 1 if self.layout == "image" else x.dim() - 1
        shape = [1] * x.dim()
        shape[c_dim] = -1
        keep = None
        if mask is not None:
            if self.layout == "image" or x.dim() != 3 or mask.shape != x.shape[:2]:
                raise ValueError(f"powernorm: a mask (N, T) needs tokens (N, T, C); got mask "
                                 f"{tuple(mask.shape)} for input {tuple(x.shape)} in layout {self.layout!r}")
            keep = mask.bool().unsqueeze(-1)  # (N, T, 1)
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        xf = x.to(acc)
        if keep is not None:  # where(), not multiplication: a non-finite pad must not leak (0 * inf = NaN)
            xf = torch.where(keep, xf, 0.0)
        if self.group_scaling is not None:
            xf = self._group_scale(xf, c_dim)
        if self.training:
            phi_b, n = self.batch_stats(xf.detach(), c_dim, keep)  # (C,), ()
            has = n > 0
            step = self.iters + has.long()  # this step's 1-based index
            warm = step <= self.warmup_iters
            psi2 = torch.where(warm, phi_b, self.running_phi.to(acc))
            inv_psi = torch.rsqrt(psi2 + self.eps)
            z = _PowerNormalize.apply(xf, inv_psi.view(shape), self.running_nu, self.alpha_bkw, n, c_dim)
            with torch.no_grad():
                it = step.clamp(min=1).to(acc)
                phi = self.running_phi.to(acc)
                phi = torch.where(step < self.warmup_iters, phi * (it - 1) / it + phi_b / it, phi)
                phi = self.alpha_fwd * phi + (1.0 - self.alpha_fwd) * phi_b
                self.running_phi.copy_(torch.where(has, phi, self.running_phi.to(acc)))
                self.iters.copy_(step)
        else:
            z = xf * torch.rsqrt(self.running_phi.to(acc) + self.eps).view(shape)
        y = z * self.weight.view(shape) + self.bias.view(shape) if self.affine else z
        if keep is not None:
            y = torch.where(keep, y, 0.0)  # padded positions -> 0
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, layout={self.layout}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
                f"alpha_bkw={self.alpha_bkw}, affine={self.affine}, warmup_iters={self.warmup_iters}, "
                f"group_scaling={self.group_scaling}")
