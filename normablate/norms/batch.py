"""BatchNorm (``bn``) and Santurkar et al.'s noisy BatchNorm (``noisy_bn``).

``bn`` *is* PyTorch's BatchNorm (subclassing ``_BatchNorm``): same statistics, running-stat update
(``running = (1 - m) * running + m * batch``, m = 0.1, unbiased running_var) and kernels, so it matches
``nn.BatchNorm1d/2d`` exactly. For tokens ``(N, T, C)`` it normalizes each channel over N*T positions.

Ghost BatchNorm (``ghost_batch_size: k``, Hoffer et al. 2017; off by default) for ``bn``, ``noisy_bn`` and
``masked_bn``: in training, the batch statistics come from fixed consecutive groups of k samples (sample i is in
group i // k), each group normalized with its own mean and variance, exactly as BN applied to each group
separately; the optimizer still steps once on the whole batch. This is a data-parallel run's unsynchronized BN
(Wu & He 2018's per-GPU batch of 2 inside an optimizer batch of 32 per step) on one process, at an unchanged step
count. Precisely:

* groups: the input ``(N, ...)`` is read as ``(N/k, k, ...)`` (a view, no copy for contiguous input); statistics
  per (group, channel) over the group's samples and every other dim but the channel (``masked_bn``: over the
  group's real tokens only). Outputs, input and parameter gradients equal ``nn.BatchNorm`` on each group (tested).
* running statistics: PyTorch's update applied once per group, in group order, as if the groups were
  consecutive batches: ``running <- (1 - m) running + m batch_g`` for g = 1..N/k (unbiased variance of each
  group; ``momentum: null`` = the cumulative average over groups), computed in one closed form
  ``(1 - m)^G running + sum_g m (1 - m)^(G - g) batch_g`` (float64 weights). ``num_batches_tracked`` counts
  groups. (``masked_bn``: a group without a real token is skipped, as an all-pad batch is.) Note the
  consequence: at momentum 0.1 the running statistics average over the last ~10 *groups* (~10k samples), so
  with small k they are noisier than a whole-batch BN's; ``trainer.precise_bn`` recomputes population
  statistics when that matters.
* remainder: in training the batch must be divisible by k (``normablate`` refuses a training batch per rank that
  is not, at config time; a direct call raises ``ValueError`` naming ``ghost_batch_size``). Diagnostic passes that
  evaluate with batch statistics on batches of any size (the validation's ``val/*_batchstats``, PreciseBN) set
  ``allow_partial_ghost_group`` on the layer: then the last N mod k samples form one smaller group (as they do in
  eval mode with ``track_running_stats: false``, where batches of any size are evaluated).
* eval uses the running statistics, as BN (so eval-mode ghost BN is BN, and folds into a conv the same way);
  with ``track_running_stats: false`` eval uses ghost-group batch statistics too.
* ``k`` equal to the batch is exactly BN. ``sync: true`` (or ``trainer.sync_batchnorm``) is refused: a ghost
  group is a part of one rank's batch, a synchronized BN pools every rank's batch; the two contradict.
* speed: contiguous fp32/fp64 images run on PyTorch's fused kernels (``_GhostImageFn``); tokens, masked tokens,
  channels-last, fp16/bf16 input and torch.compile take the composed autograd ops of ``ghost_batch_norm``
  (written by hand: neither PyTorch nor timm has a ghost BatchNorm); see README "Norms and backbones".
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


def check_ghost_batch_size(name: str, ghost_batch_size: int | None, sync: bool) -> int | None:
    """``ghost_batch_size``: null (off) or an integer >= 1, and not with ``sync`` (see the module doc)."""
    if ghost_batch_size is None:
        return None
    k = ghost_batch_size
    if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or k < 1:
        raise ValueError(f"{name}: ghost_batch_size must be null (off) or an integer >= 1 (samples per ghost group), "
                         f"got {k!r}")
    if sync:
        raise ValueError(f"{name}: ghost_batch_size={int(k)} cannot be combined with sync: true: a ghost group is "
                         f"part of one rank's batch, a synchronized BN pools every rank's batch; use one or the other")
    return int(k)


def ghost_batch_norm(x4: torch.Tensor, keep4: torch.Tensor | None, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of each group of ``x4`` (G, R, C, S) over its dims 1 and 3 (R rows of S values per
    channel), with gradient. ``keep4`` (G, R, 1, 1) bool: only those rows count (others output 0, get no gradient,
    and a non-finite value there never leaks). Returns ``y`` (shape of x4), the per-group ``mean`` and biased
    ``var`` (G, C) and the per-group count of values per channel ``n`` (G,), the last three without gradient.
    Composed from autograd ops (exact gradients by construction); statistics in fp32 for fp16/bf16."""
    g, _, c, _ = x4.shape
    acc = x4.dtype if x4.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x4.to(acc)
    if keep4 is None:
        var, mean = torch.var_mean(xf, dim=(1, 3), correction=0, keepdim=True)  # (G, 1, C, 1)
        xc = xf - mean
        n = torch.full((g,), float(x4.shape[1] * x4.shape[3]), dtype=acc, device=x4.device)
    else:
        keep_f = keep4.to(acc)
        cnt = keep_f.sum(dim=(1, 3), keepdim=True) * x4.shape[3]  # (G, 1, 1, 1)
        denom = cnt.clamp(min=1)
        xf = torch.where(keep4, xf, 0.0)  # where(), not *: a pad's inf/NaN must not leak (0 * inf = NaN)
        mean = xf.sum(dim=(1, 3), keepdim=True) / denom
        xc = xf - mean * keep_f  # exactly 0 at pads
        var = (xc * xc).sum(dim=(1, 3), keepdim=True) / denom
        n = cnt.view(g)
    # centred values times the per-(group, channel) scale, as PyTorch's kernels: the parameter gradients are then
    # sums of g * (x - mean), without the cancellation of sum(g * x) - mean * sum(g)
    scale = torch.rsqrt(var + eps)  # (G, 1, C, 1)
    if weight is not None:
        scale = scale * weight.to(acc).view(1, 1, c, 1)
    y = xc * scale if bias is None else torch.addcmul(bias.to(acc).view(1, 1, c, 1), xc, scale)
    if keep4 is not None:
        y = torch.where(keep4, y, 0.0)
    return y.to(x4.dtype), mean.detach().view(g, c), var.detach().view(g, c), n.detach()


def _weights_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no float64


@register("bn")
class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over every dim but the channel; eval uses running statistics. ``ghost_batch_size: k``: batch
    statistics over consecutive groups of k samples in training (Ghost BN; module doc)."""

    is_normalization = True
    norm_label = "bn"  # the registered name, for error messages

    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 sync: bool = False, ghost_batch_size: int | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.layout = layout
        self.sync = bool(sync)  # pool batch statistics over data-parallel ranks in training (norms/sync.py)
        self.ghost_batch_size = check_ghost_batch_size(self.norm_label, ghost_batch_size, self.sync)  # None: off
        self.allow_partial_ghost_group = False  # diagnostics on odd-size batches: the last group may be smaller

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2D input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        # Plain BN ignores the mask on purpose: padded tokens enter its statistics (that is the ablation).
        if self.ghost_batch_size is not None and (self.training or not self.track_running_stats):
            return self.ghost_forward(x)
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

    def ghost_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Batch statistics over consecutive groups of ``ghost_batch_size`` samples of ``x`` (image (N, C, ...) or
        tokens (N, ..., C)); ``mask`` (N, T) restricts each group's statistics to its real tokens. Updates the
        running statistics group by group in training (module doc)."""
        label = self.norm_label
        if self.sync:
            raise ValueError(f"{label}: ghost_batch_size={self.ghost_batch_size} cannot be combined with sync")
        k, n = self.ghost_batch_size, x.shape[0]
        rest = n % k
        if rest and self.training and not self.allow_partial_ghost_group:
            raise ValueError(
                f"{label}: ghost_batch_size={k} needs a batch divisible by {k} in training; got {n} samples "
                f"({n // k} group(s) of {k} and {rest} left over). Use a batch size that is a multiple of "
                f"ghost_batch_size (per rank under data parallelism).")
        if not rest:
            return self._ghost_groups(x, mask, k)
        cut = n - rest  # the last `rest` samples form one smaller group (diagnostic passes only)
        parts = [(0, cut, k), (cut, n, rest)] if cut else [(0, n, rest)]
        return torch.cat([self._ghost_groups(x[a:b], None if mask is None else mask[a:b], size)
                          for a, b, size in parts])

    def _ghost_groups(self, x: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
        """``ghost_forward`` on a batch divisible by ``k``."""
        g = x.shape[0] // k
        tokens = self.layout == "tokens" and x.dim() > 2
        nhwc = not tokens and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        if tokens:  # (N, ..., C) -> (G, k*T, C, 1): a view
            x4 = x.reshape(g, -1, x.shape[-1], 1)
        elif nhwc:  # channels-last image: (N, H, W, C) memory -> (G, k*H*W, C, 1), a view; output channels-last
            x4 = x.permute(0, 2, 3, 1).reshape(g, -1, x.shape[1], 1)
        else:  # (N, C, ...) -> (G, k, C, S): a view
            x4 = x.reshape(g, k, x.shape[1], -1)
        if mask is None and x4.shape[1] * x4.shape[3] <= 1 and x.numel():
            raise ValueError(
                f"{self.norm_label}: ghost_batch_size={k} leaves one value per channel in "
                f"each group (input of shape {tuple(x.shape)}); batch statistics need more: use a larger "
                f"ghost_batch_size")
        if (mask is None and not tokens and not nhwc and x.dim() > 2 and x4.shape[3] > 1 and x.is_contiguous()
                and x.dtype in (torch.float32, torch.float64) and x.numel()
                and all(p is None or p.dtype == x.dtype for p in (self.weight, self.bias))
                and not torch.compiler.is_compiling()):  # images: PyTorch's fused kernels (_GhostImageFn)
            y, mean, var = _GhostImageFn.apply(x, k, self.weight, self.bias, self.eps)
            if self.training and self.track_running_stats:
                cnt = torch.full((g,), float(x4.shape[1] * x4.shape[3]), dtype=mean.dtype, device=x.device)
                self._ghost_update_running(mean, var, cnt)
            return y
        keep4 = None
        if mask is not None:
            keep4 = mask.bool().reshape(g, -1, 1, 1)
            torch._assert_async(keep4.sum(dim=(1, 2, 3)).ne(1).all(),
                                f"{self.norm_label}: ghost_batch_size={k}: a ghost group holds exactly one real "
                                f"token; batch statistics need more than one per channel")
        y4, mean, var, cnt = ghost_batch_norm(x4, keep4, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._ghost_update_running(mean, var, cnt)
        if nhwc:
            return y4.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
        return y4.view(x.shape)

    @torch.no_grad()
    def _ghost_update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """PyTorch's running-stat update once per group, in group order (a group with n = 0 is skipped), in one
        closed form: new = prod_g (1 - m_g) * running + sum_g m_g * prod_{h > g} (1 - m_h) * stat_g."""
        if n.numel() == 0:
            return
        wd = _weights_dtype(self.running_mean)
        counted = n > 0  # (G,)
        if self.momentum is None:  # cumulative average over every group seen: the j-th counted group weighs 1/j
            idx = self.num_batches_tracked.to(wd) + torch.cumsum(counted.to(wd), 0)
            m = torch.where(counted, 1.0 / idx.clamp(min=1), 0.0)
        else:
            m = counted.to(wd) * self.momentum
        self.num_batches_tracked.add_(counted.sum().to(self.num_batches_tracked.dtype))
        nd = n.to(wd)
        unbiased = var.to(wd) * torch.where(nd > 1, nd / (nd - 1).clamp(min=1), 1.0)[:, None]
        keep_from = torch.cumprod((1.0 - m).flip(0), 0).flip(0)  # keep_from[g] = prod_{h >= g} (1 - m_h)
        w = m * torch.cat([keep_from[1:], keep_from.new_ones(1)])  # (G,): weight of group g's statistics
        for buf, stat in ((self.running_mean, mean.to(wd)), (self.running_var, unbiased)):
            buf.copy_((keep_from[0] * buf.to(wd) + (w[:, None] * stat).sum(0)).to(buf.dtype))

    def extra_repr(self) -> str:
        ghost = "" if self.ghost_batch_size is None else f", ghost_batch_size={self.ghost_batch_size}"
        return super().extra_repr() + f", layout={self.layout}" + ghost


class _NoisyBatchNormFn(torch.autograd.Function):
    """Training-mode BN followed by a per-(sample, channel) affine noise ``out = bn(x) * s + m``, fused.

    x3: (N, C, S) (image, channels second) or (N, S, C) (tokens, channels last), contiguous; scale ``s`` and
    shift ``m``: (N or 1, C, 1) or (N or 1, 1, C), constants (no gradient). With the batch mean ``mu`` and
    ``r = rsqrt(var + eps)`` (biased var over the M = N*S values of each channel) and ``a = w * r``::

        forward   out = x * (a * s) + ((b - mu * a) * s + m)      one elementwise pass after the statistics
        backward  BN's backward of g * s (dx, dw = sum g s xhat, db = sum g s: PyTorch's fused kernel)

    The forward folds the noise into BN's per-channel ``x * alpha + beta`` (PyTorch's CPU kernel folds the same
    way), so it costs the passes of BN's forward; the composed module paid one more pass each way (BN, then an
    ``addcmul`` over the activations, and its backward ``g * s``). The backward keeps the ``g * s`` pass: no
    PyTorch kernel takes per-(sample, channel) weights inside BN's backward reduction. Statistics: tokens use
    PyTorch's own kernel and running-stat update (``batch_norm_update_stats``); images use ``_image_moments``
    (same two-pass statistics, ~3x faster than PyTorch's NCHW statistics kernel on this CPU)."""

    @staticmethod
    def forward(ctx, x3, weight, bias, scale, shift, running_mean, running_var, momentum, eps, tokens):  # noqa: ANN001
        n = x3.shape[0]
        c = x3.shape[2] if tokens else x3.shape[1]
        if tokens:  # PyTorch's statistics kernel (channels last) and running-stat update
            mean, var = torch.batch_norm_update_stats(x3.view(-1, c), running_mean, running_var, momentum)
        else:
            mean, var = _image_moments(x3)
            if running_mean is not None:
                _update_running(running_mean, running_var, mean, var, x3.numel() // c, momentum)
        rstd = torch.rsqrt(var + eps)
        a = rstd if weight is None else rstd * weight
        shift_c = -mean * a if bias is None else bias - mean * a
        ch = (1, 1, c) if tokens else (1, c, 1)
        big_a = scale * a.view(ch)  # (N or 1, ...): the per-(sample, channel) multiplier
        big_b = torch.addcmul(shift, scale, shift_c.view(ch))
        if tokens:  # channels last: the inner dim is contiguous in every operand
            out = torch.addcmul(big_b, x3, big_a)
        else:  # an image's (sample, channel) pairs as the channels of a (1, N*C, S) view
            per = scale.shape[0] == n
            # returned in that shape: a view made here could not be modified in place (an inplace ReLU)
            out = _affine(x3.view(1, -1, x3.shape[2]) if per else x3, big_a.reshape(-1), big_b.reshape(-1))
        ctx.save_for_backward(x3, weight, scale, mean, rstd)
        ctx.tokens, ctx.has_bias = tokens, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001
        x3, weight, scale, mean, rstd = ctx.saved_tensors
        c = x3.shape[2] if ctx.tokens else x3.shape[1]
        gs = g.reshape(x3.shape) * scale
        if ctx.tokens:
            gs, x2 = gs.view(-1, c), x3.view(-1, c)
        else:
            x2 = x3
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            gs, x2, weight, None, None, mean, rstd, True, 0.0,
            [ctx.needs_input_grad[0], weight is not None, ctx.has_bias])
        return (dx.view(x3.shape) if dx is not None else None, dw, db) + (None,) * 7


def _image_moments(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x3 (N, C, S): per-(sample, channel) moments, pooled exactly.

    PyTorch's CPU statistics kernel for contiguous (N, C, H, W) input is slow (measured ~11 ms of nn.BatchNorm2d's
    ~20 ms forward at (64, 64, 32, 32), threads 1), and ``torch.var_mean`` over rows is slower still (43 ms). The
    one vectorized, accurate per-row moments kernel PyTorch exposes is GroupNorm's forward: on the (1, N*C, S)
    view with N*C groups it returns each (sample, channel)'s mean and rstd (Welford, ~3.5 ms; its normalized output
    is discarded). Pooled with Chan et al.'s formula (as norms/sync.py pools ranks): mean = mean of the means,
    M2 = S * (sum of variances + sum of squared deviations of the means). eps 1e-30 keeps rstd finite for a
    constant row and is removed again (var = 1 / rstd^2 - eps)."""
    mu, var_nc = _row_moments(x3)
    mean = mu.mean(0)
    var = var_nc.mean(0) + (mu - mean).square_().mean(0)
    return mean, var


def _row_moments(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (N, C) of each (sample, channel) row of x3 (N, C, S): GroupNorm's forward kernel
    on the (1, N*C, S) view (see ``_image_moments``)."""
    n, c, s = x3.shape
    tiny = 1e-30
    _, mu, rs = torch.native_group_norm(x3.view(1, n * c, s), None, None, 1, n * c, s, n * c, tiny)
    return mu.view(n, c), (rs.view(n, c).square().reciprocal_() - tiny).clamp_(min=0.0)


class _GhostImageFn(torch.autograd.Function):
    """Ghost BN of contiguous images x (N, C, ...) in groups of k samples on PyTorch's fused kernels; returns
    (y, mean, var): y in x's shape, mean and biased var (G, C) without gradient.

    forward   per-(sample, channel) moments (``_row_moments``) pooled exactly per group (Chan et al.), then
              ``y = x * A + B`` with A = w * rstd, B = b - mean * A per (group, channel): one broadcast addcmul
    backward  per (sample, channel) sums of g and g * xhat from BN's fused eval-mode backward kernel on the
              (1, N*C, S) view (one pass), summed over each group's k samples; then BN's backward per group in one
              addcmul and one addcmul_:  dx = x * P + Q + g * w rstd,  P = -w rstd^2 sum(g xhat) / n,
              Q = -w rstd sum(g) / n - P * mean  (n = k * S values per channel and group)
    y is made in x's shape (not reshaped after the Function): an inplace ReLU on a view of a Function's output
    would make autograd copy the whole activation in the backward. The composed autograd version (var_mean, sub,
    addcmul and their backwards) measured ~3.5x ``bn``'s forward+backward."""

    @staticmethod
    def forward(ctx, x, k, weight, bias, eps):  # noqa: ANN001
        n, c = x.shape[:2]
        s, g = x.numel() // (n * c), n // k
        mu, var_nc = _row_moments(x.view(n, c, s))
        mu4, var4 = mu.view(g, k, c), var_nc.view(g, k, c)
        mean = mu4.mean(1)  # (G, C)
        var = var4.mean(1) + (mu4 - mean[:, None]).square_().mean(1)
        rstd = torch.rsqrt(var + eps)
        a = rstd if weight is None else rstd * weight
        b = -mean * a if bias is None else bias - mean * a
        y = torch.addcmul(_per_sample(b, x, k), x, _per_sample(a, x, k))
        ctx.save_for_backward(x, weight, mean, var, rstd)
        ctx.eps, ctx.k, ctx.has_bias = eps, k, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, *_):  # noqa: ANN001
        x, weight, mean, var, rstd = ctx.saved_tensors
        k = ctx.k
        n, c = x.shape[:2]
        s, g = x.numel() // (n * c), n // k
        pair = lambda t: t[:, None].expand(g, k, c).reshape(-1)  # noqa: E731  (G, C) -> (N*C,)
        gy = gy.contiguous()
        w = torch.ones_like(rstd) if weight is None else weight.expand(g, c)
        _, gw_pair, gb_pair = torch.ops.aten.native_batch_norm_backward(
            gy.view(1, n * c, s), x.view(1, n * c, s), pair(w), pair(mean), pair(var), None, None, False, ctx.eps,
            [False, True, True])
        gw, gb = gw_pair.view(g, k, c).sum(1), gb_pair.view(g, k, c).sum(1)  # (G, C): sum g xhat, sum g
        dx = None
        if ctx.needs_input_grad[0]:
            wr = w * rstd
            p = -wr * rstd * gw / (k * s)
            q = -wr * gb / (k * s) - p * mean
            dx = torch.addcmul(_per_sample(q, x, k), x, _per_sample(p, x, k))
            dx.addcmul_(gy, _per_sample(wr, x, k))
        dw = gw.sum(0) if weight is not None and ctx.needs_input_grad[2] else None
        db = gb.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, dw, db, None


def _per_sample(t: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """(G, C) per (group, channel) -> (N, C, 1, ...) per (sample, channel), broadcasting against x (N, C, ...)."""
    g, c = t.shape
    return t[:, None].expand(g, k, c).reshape(g * k, c, *([1] * (x.dim() - 2)))


@torch.no_grad()
def _update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    count: int, momentum: float) -> None:
    """PyTorch's update: running = momentum * batch + (1 - momentum) * running, unbiased batch variance."""
    running_mean.copy_(mean * momentum + running_mean * (1.0 - momentum))
    running_var.copy_(var * (count / (count - 1)) * momentum + running_var * (1.0 - momentum))


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x * w + b`` per channel (dim 1) in one pass: PyTorch's eval-mode BN kernel with mean 0, var 1 and eps 0
    (alpha = w / sqrt(1 + 0) = w exactly, beta = b - 0 * w = b), vectorized where a broadcast addcmul is not."""
    zeros = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.batch_norm(x, w, b, zeros, ones, False, 0.0, 0.0, False)


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

    norm_label = "noisy_bn"

    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, noise_mean: float = 0.5,
                 noise_scale: float = 1.5, per_sample: bool = True, sync: bool = False,
                 ghost_batch_size: int | None = None) -> None:
        super().__init__(num_features, layout=layout, eps=eps, momentum=momentum, affine=affine, sync=sync,
                         ghost_batch_size=ghost_batch_size)
        if noise_scale < 1.0 or noise_mean < 0.0:
            raise ValueError(f"noisy_bn needs noise_scale >= 1 and noise_mean >= 0, got {noise_scale}, {noise_mean}")
        self.noise_mean, self.noise_scale, self.per_sample = noise_mean, noise_scale, per_sample
        self.noise_enabled = True  # switched off to measure batch-statistics loss without noise

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.noise_enabled and self._fused_ok(x):
            return self._noisy_train_fused(x)
        y = super().forward(x, mask)
        if not self.training:
            return y * ((1.0 + self.noise_scale) / 2.0)
        if not self.noise_enabled:
            return y
        c_dim = 1 if self.layout == "image" else y.dim() - 1
        scale, shift = self._draw_noise(y, c_dim)
        # the noise in one fused pass (addcmul), not a multiply and an add over the activations
        return torch.addcmul(shift, y, scale)

    def _draw_noise(self, x: torch.Tensor, c_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each shaped to broadcast against ``x``: per (sample, channel) or per channel. One draw of
        U(0, 1) for scale and shift together, mapped to U(1, noise_scale) and U(-mean, mean)."""
        shape = [1] * x.dim()
        shape[c_dim] = x.shape[c_dim]
        if self.per_sample:
            shape[0] = x.shape[0]
        u = torch.rand((2, *shape), device=x.device, dtype=x.dtype)
        scale = u[0].mul_(self.noise_scale - 1.0).add_(1.0)
        shift = u[1].mul_(2.0 * self.noise_mean).sub_(self.noise_mean)
        return scale, shift

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """Whether the training forward can take ``_NoisyBatchNormFn``: fp32/fp64 contiguous input, parameters of
        the same dtype, not under torch.compile (Inductor fuses the plain composition itself, and the Function
        updates buffers inside), not synchronized over ranks (the pooled statistics are ``sync.batch_norm``'s)."""
        if x.dtype not in (torch.float32, torch.float64) or x.dim() < 2 or not x.is_contiguous():
            return False
        if self.affine and (self.weight.dtype != x.dtype or self.bias.dtype != x.dtype):
            return False
        if self.track_running_stats and self.running_mean is not None and self.running_mean.dtype != x.dtype:
            return False
        if (self.sync and sync_active()) or self.ghost_batch_size is not None:  # ghost: BN per group, then noise
            return False
        return not torch.compiler.is_compiling()

    def _noisy_train_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward with noise: the same outputs, gradients and running statistics as ``bn`` followed by
        the noise affine, with as many passes over the activations as BN alone (``_NoisyBatchNormFn``)."""
        tokens = self.layout == "tokens"
        c_dim = x.dim() - 1 if tokens else 1
        check_batch_size(x, c_dim, True)
        # momentum and num_batches_tracked exactly as nn.modules.batchnorm._BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        scale, shift = self._draw_noise(x, c_dim)  # same draws, same order as the composed path
        n, c = x.shape[0], x.shape[c_dim]
        if tokens:  # (N, ..., C) -> (N, S, C); noise (N or 1, 1, C)
            x3, view = x.view(n, -1, c), (scale.shape[0], 1, c)
        else:  # (N, C, ...) -> (N, C, S); noise (N or 1, C, 1)
            x3, view = x.view(n, c, -1), (scale.shape[0], c, 1)
        y = _NoisyBatchNormFn.apply(x3, self.weight, self.bias, scale.view(view), shift.view(view), *running,
                                    factor, self.eps, tokens)
        return y.view(x.shape)
