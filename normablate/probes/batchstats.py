"""Batch-statistics fluctuation per BN-family layer (Shen et al. 2020, "PowerNorm", Sec. 3, Figs. 2 and 3).

Shen et al.'s claim about (masked) BatchNorm in Transformers on text is that its *batch statistics fluctuate*:
the batch mean and variance lie far from the running ones, and the gradients of the loss with respect to them are
large and noisy, far more than in a CNN on images. Their figures show, for a BN layer over training, the distance
between the batch statistics (mu_B, sigma_B^2) and the running ones (mu, sigma^2), and the norms of the gradients
dL/dmu_B and dL/dsigma_B^2. Their repository (sIncerass/powernorm) holds the norms but not the code behind those
figures, so this is our re-implementation of the measurement, per layer, on the probed training batch:

* ``mean_dist`` = mean over channels of ``|mu_B - mu| / sqrt(sigma^2 + eps)``: the batch mean's distance from the
  running mean in running standard deviations (relative, so comparable across layers and norms);
* ``var_dist``  = mean over channels of ``|sigma_B^2 - sigma^2| / (sigma^2 + eps)`` (sigma_B^2 unbiased, the
  running buffer's convention);
* ``grad_mean`` = ``||dL/dmu_B||_2`` and ``grad_var`` = ``||dL/dsigma_B^2||_2`` over channels: the partial
  derivatives of the training loss with respect to the batch statistics as nodes of the graph (those of Ioffe &
  Szegedy's backward, Sec. 3: through this layer's normalization; the statistics of later layers still depend on
  this layer's output). Computed by recomputing the layer's training forward with ``mu_B + d_mu`` and
  ``sigma_B^2 + d_var`` in place of the statistics, ``d_mu = d_var = 0`` leaf tensors (the values are unchanged),
  and one backward: the gradient w.r.t. ``d_mu`` is dL/dmu_B.

Layers and what "batch statistics" means for each (tokens layout; images the same over N, H, W):

* ``bn`` (and ``nn.BatchNorm*``): mean and variance over every position, padding included (that is plain BN);
* ``masked_bn``: over real tokens only (padding neither enters the statistics nor gets a gradient);
* ghost BN (``ghost_batch_size: k``): per ghost group; distances averaged over groups, gradient norms over all
  (group, channel) entries;
* ``noisy_bn``: the BN statistics before the noise (the noise draw is the training step's own);
* ``batch_renorm``: mu_B and sigma_B^2 (r and d carry no gradient, as in the layer);
* ``powernorm``: its batch statistic is the quadratic mean psi_B^2 (no mean: ``mean_*`` absent); ``var_dist``
  compares psi_B^2 with the running psi^2, and ``grad_var`` is dL/dpsi_B^2, which is non-zero only during the
  layer's warm-up: afterwards its forward divides by the running psi, so the loss does not depend on the batch
  statistic at all (exactly 0, by construction: that is PowerNorm's fix). Its own approximate backward is kept
  for everything upstream.

The recomputation is the layer's training forward written with autograd ops (same numbers up to float rounding
as the layers' fused kernels); it updates no running statistic. It runs inside ``ProbeCallback``, which restores
parameters, buffers, RNG state and ``.grad`` afterwards, so probing does not change the run (tested). Under
data-parallel training the statistics are each rank's own (a ``sync`` layer's pooled statistics are not probed).
Hand-written: no library measures this.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from ..norms.batch import BatchNorm, NoisyBatchNorm
from ..norms.masked import MaskedBatchNorm
from ..norms.powernorm import PowerNorm
from ..norms.renorm import BatchRenorm

MEASURES = ("mean_dist", "var_dist", "grad_mean", "grad_var")


def stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BN-family layer the probe measures, in registration order: PyTorch's and our
    BatchNorms (bn, masked_bn, noisy_bn, batch_renorm, ghost BN) and PowerNorm. Layers without running statistics
    (``track_running_stats: false``) are measured too (gradients only; the distances are then absent)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, PowerNorm))]


# ------------------------------------------------------------------------------------------ the recomputation
def _group_view(m: nn.Module, x: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` as (G, R, C, S): G groups (ghost BN; else 1) of R rows of S values per channel, the real-token mask
    as (G, R, 1, 1) (masked_bn only) and the map from that shape back to ``x``'s."""
    tokens = getattr(m, "layout", "image") == "tokens" and x.dim() > 2
    k = getattr(m, "ghost_batch_size", None) or x.shape[0]
    g = max(x.shape[0] // k, 1)
    if tokens:  # (N, ..., C): channel last
        x4 = x.reshape(g, -1, x.shape[-1], 1)
    else:  # (N, C, ...)
        x4 = x.reshape(g, x.shape[0] // g, x.shape[1], -1)
    keep4 = None
    if mask is not None and isinstance(m, MaskedBatchNorm) and tokens:
        keep4 = mask.bool().reshape(g, -1, 1, 1)
    return x4, keep4, lambda y4: y4.reshape(x.shape)


def _moments(x4: torch.Tensor, keep4: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (group, channel) mean and biased variance over dims 1 and 3 (real rows only), with gradient, as
    (G, 1, C, 1); and the count of values per channel (G, 1, 1, 1)."""
    if keep4 is None:
        var, mean = torch.var_mean(x4, dim=(1, 3), correction=0, keepdim=True)
        n = torch.full((x4.shape[0], 1, 1, 1), float(x4.shape[1] * x4.shape[3]), dtype=x4.dtype, device=x4.device)
        return mean, var, n
    keep_f = keep4.to(x4.dtype)
    n = keep_f.sum(dim=(1, 3), keepdim=True) * x4.shape[3]
    xf = torch.where(keep4, x4, 0.0)
    mean = xf.sum(dim=(1, 3), keepdim=True) / n.clamp(min=1)
    xc = (xf - mean) * keep_f
    var = (xc * xc).sum(dim=(1, 3), keepdim=True) / n.clamp(min=1)
    return mean, var, n


class _Record:
    """One layer's measurement on one forward: the zero leaves and the values to compare."""

    def __init__(self) -> None:
        self.d_mean: torch.Tensor | None = None
        self.d_var: torch.Tensor | None = None
        self.mean_dist: float | None = None
        self.var_dist: float | None = None


def _dist(batch: torch.Tensor, running: torch.Tensor | None, scale: torch.Tensor | None) -> float | None:
    if running is None:
        return None
    return float(((batch - running).abs() / scale).mean())


def _bn_forward(m: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, rec: _Record) -> torch.Tensor:
    """Training forward of a BatchNorm-family layer (bn, masked_bn, ghost, noisy_bn, batch_renorm) with the batch
    statistics shifted by zero leaves ``rec.d_mean``, ``rec.d_var`` (G, C)."""
    acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x4, keep4, back = _group_view(m, x.to(acc), mask)
    g, c = x4.shape[0], x4.shape[2]
    mean, var, n = _moments(x4, keep4)
    rec.d_mean = torch.zeros(g, c, dtype=acc, device=x.device, requires_grad=True)
    rec.d_var = torch.zeros(g, c, dtype=acc, device=x.device, requires_grad=True)
    mean_b = mean + rec.d_mean.view(g, 1, c, 1)
    var_b = var + rec.d_var.view(g, 1, c, 1)
    eps = m.eps
    if m.track_running_stats and m.running_mean is not None:
        with torch.no_grad():
            rm, rv = m.running_mean.to(acc).view(1, 1, c, 1), m.running_var.to(acc).view(1, 1, c, 1)
            counted = (n > 0).view(-1)  # ghost groups / batches with a real token
            unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
            md = ((mean - rm).abs() / torch.sqrt(rv + eps)).view(g, c)[counted]
            vd = ((unbiased - rv).abs() / (rv + eps)).view(g, c)[counted]
            rec.mean_dist = float(md.mean()) if md.numel() else None
            rec.var_dist = float(vd.mean()) if vd.numel() else None
    std = torch.sqrt(var_b + eps)
    xhat = (x4 - mean_b) / std
    if isinstance(m, BatchRenorm):  # r, d from the batch and running statistics, no gradient (renorm.py)
        with torch.no_grad():
            r_max, d_max = m.limits()
            run_std = torch.sqrt(m.running_var.to(acc).view(1, 1, c, 1) + eps)
            r = (std / run_std).clamp(1.0 / r_max.to(acc), r_max.to(acc))
            d = ((mean_b - m.running_mean.to(acc).view(1, 1, c, 1)) / run_std).clamp(-d_max.to(acc), d_max.to(acc))
        xhat = xhat * r + d
    y4 = xhat
    if m.affine:
        y4 = xhat * m.weight.to(acc).view(1, 1, c, 1) + m.bias.to(acc).view(1, 1, c, 1)
    if keep4 is not None:
        y4 = torch.where(keep4, y4, 0.0)
    y = back(y4).to(x.dtype)
    if isinstance(m, NoisyBatchNorm) and m.noise_enabled:  # the composed path of NoisyBatchNorm.forward
        c_dim = 1 if m.layout == "image" else y.dim() - 1
        scale, shift = m._draw_noise(y, c_dim)
        y = torch.addcmul(shift, y, scale)
    return y


def _powernorm_forward(m: PowerNorm, x: torch.Tensor, mask: torch.Tensor | None, rec: _Record,
                       forward: Callable) -> torch.Tensor:
    """PowerNorm's own training forward (its approximate backward included) plus a term that is exactly 0 in value
    and whose derivative w.r.t. the zero leaf ``rec.d_var`` is that of the output w.r.t. psi_B^2 (0 after
    warm-up, where the forward divides by the running psi)."""
    c_dim = 1 if m.layout == "image" else x.dim() - 1
    shape = [1] * x.dim()
    shape[c_dim] = -1
    acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    keep = None if mask is None else mask.bool().unsqueeze(-1)
    with torch.no_grad():
        xf = x.to(acc) if keep is None else torch.where(keep, x.to(acc), 0.0)
        if m.group_scaling is not None:
            xf = m._group_scale(xf, c_dim)
        phi_b, n = m.batch_stats(xf, c_dim, keep)
        warm = (m.iters + (n > 0).long()) <= m.warmup_iters  # (a new tensor) the step's 1-based index, as in the forward
        run = m.running_phi.to(acc).clone()
        rec.var_dist = float(((phi_b - run).abs() / (run + m.eps)).mean()) if bool(n > 0) else None
    y = forward(x, mask)  # after reading the running statistics and step count, which it updates
    rec.d_var = torch.zeros(1, m.num_features, dtype=acc, device=x.device, requires_grad=True)
    psi2 = torch.where(warm, phi_b + rec.d_var.view(-1), run)
    inv = torch.rsqrt(psi2 + m.eps)
    zero = xf * (inv - inv.detach()).view(shape)  # value 0; d/d(d_var) = x * d(inv)/d(psi2) in warm-up
    if m.affine:
        zero = zero * m.weight.detach().view(shape)
    if keep is not None:
        zero = torch.where(keep, zero, 0.0)
    return y + zero.to(y.dtype)


@contextmanager
def _instrumented(layers: list[tuple[str, nn.Module]], records: dict[str, list[_Record]]):
    """Each layer's ``forward`` replaced (instance attribute) by the measuring one while inside."""
    try:
        for name, m in layers:
            def fwd(x, mask=None, *, _m=m, _name=name, _orig=m.forward):
                if not _m.training:
                    return _orig(x, mask) if isinstance(_m, (BatchNorm, PowerNorm)) else _orig(x)
                rec = _Record()
                records.setdefault(_name, []).append(rec)
                if isinstance(_m, PowerNorm):
                    return _powernorm_forward(_m, x, mask, rec, _orig)
                return _bn_forward(_m, x, mask if isinstance(_m, MaskedBatchNorm) else None, rec)
            m.forward = fwd
        yield
    finally:
        for _, m in layers:
            m.__dict__.pop("forward", None)


def batch_stats(loss_fn: Callable[[], torch.Tensor], layers: list[tuple[str, nn.Module]]) -> dict[str, dict]:
    """Measure every layer in ``layers`` on one forward/backward of ``loss_fn`` (which must restore the training
    step's buffers and RNG state, as ``ProbeCallback``'s does). Returns ``{layer: {measure: value}}`` with the
    measures of the module doc (a layer called several times in one forward: distances averaged over the calls,
    gradient norms over all of them together). Parameters' ``.grad`` are left untouched (``autograd.grad``)."""
    records: dict[str, list[_Record]] = {}
    with _instrumented(layers, records), torch.enable_grad():
        loss = loss_fn()
    leaves, where = [], []
    for name, recs in records.items():
        for rec in recs:
            for key in ("d_mean", "d_var"):
                t = getattr(rec, key)
                if t is not None:
                    leaves.append(t)
                    where.append((name, key))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else []
    sq: dict[tuple[str, str], float] = {}
    for (name, key), gr in zip(where, grads):
        sq[(name, key)] = sq.get((name, key), 0.0) + (0.0 if gr is None else float(gr.double().pow(2).sum()))
    out: dict[str, dict] = {}
    for name, recs in records.items():
        vals: dict[str, float] = {}
        for key in ("mean_dist", "var_dist"):
            got = [getattr(r, key) for r in recs if getattr(r, key) is not None]
            if got:
                vals[key] = sum(got) / len(got)
        for key, leaf in (("grad_mean", "d_mean"), ("grad_var", "d_var")):
            if (name, leaf) in sq:
                vals[key] = sq[(name, leaf)] ** 0.5
        out[name] = vals
    return out


__all__ = ["MEASURES", "batch_stats", "stat_layers"]
