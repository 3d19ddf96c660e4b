"""The fast norm kernels (issue 11) compute the same math as PyTorch's layers: bn on (N*T, C), masked BN's
autograd.Function, RMSNorm's closed-form backward, the fused noisy-BN noise. Speed is measured by
``normablate bench``, never here."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normablate as nb
from normablate.norms.masked import _MaskedBatchNormFn
from normablate.norms.rms import _RMSNormFn


def test_bn_tokens_non_contiguous_input_equals_batchnorm1d():
    ours, ref = nb.norms.create("bn", 6, layout="tokens").double(), nn.BatchNorm1d(6).double()
    base = torch.randn(5, 6, 4, dtype=torch.float64, requires_grad=True)
    x = base.transpose(1, 2)  # (N, T, C) view, not contiguous
    y = ours(x)
    ref_x = base.detach().clone().requires_grad_(True)
    y_ref = ref(ref_x.transpose(1, 2).reshape(-1, 6)).view(5, 4, 6)
    w = torch.randn_like(y)
    (y * w).sum().backward(), (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(base.grad, ref_x.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_masked_bn_function_gradcheck(affine):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    keep = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)[:, None]
    w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_(affine)
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(affine)
    args = (x, keep, w, b, 1e-5) if affine else (x, keep, None, None, 1e-5)
    assert torch.autograd.gradcheck(lambda *a: _MaskedBatchNormFn.apply(*a)[0], args)


def test_masked_bn_cumulative_momentum_and_empty_batch_match_batchnorm1d():
    """momentum=None (cumulative average) counts only batches with real tokens, like BN on x[mask] alone."""
    mbn = nb.norms.create("masked_bn", 4, layout="tokens", momentum=None).double()
    ref = nn.BatchNorm1d(4, momentum=None).double()
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g) * (step + 1)
        mask = torch.rand(3, 5, generator=g) > 0.4
        mask[0, :2] = True
        if step == 2:
            mbn(x, mask=torch.zeros_like(mask))  # no real token: changes nothing
        mbn(x, mask=mask), ref(x[mask])
    assert int(mbn.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    torch.testing.assert_close(mbn.running_mean, ref.running_mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mbn.running_var, ref.running_var, atol=1e-12, rtol=1e-12)


def test_masked_bn_exactly_one_real_token_is_an_error_in_training_only():
    m = nb.norms.create("masked_bn", 3, layout="tokens")
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    with pytest.raises((RuntimeError, ValueError), match="exactly one real token"):
        m(torch.randn(2, 4, 3), mask=mask)
    m.eval()
    assert torch.isfinite(m(torch.randn(2, 4, 3), mask=mask)).all()


def test_masked_bn_non_finite_pad_gradient_does_not_leak():
    m = nb.norms.create("masked_bn", 3, layout="tokens").double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    dy = torch.randn(2, 5, 3, dtype=torch.float64)
    dy[~mask] = float("nan")  # whatever flows back into a pad position must not matter
    m(x, mask=mask).backward(dy)
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert torch.isfinite(m.weight.grad).all() and torch.isfinite(m.bias.grad).all()


def test_masked_bn_bf16_input_uses_fp32_statistics():
    m = nb.norms.create("masked_bn", 8, layout="tokens")
    ref = copy.deepcopy(m)
    x = torch.randn(4, 6, 8) * 3 + 2
    mask = torch.rand(4, 6) > 0.3
    y16 = m(x.bfloat16(), mask=mask)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref(x.bfloat16().float(), mask=mask), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("cd,shape", [(-1, (3, 4, 6)), (1, (2, 6, 3, 3))])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_function_gradcheck(cd, shape, affine):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6, cd), (x, w))


@pytest.mark.parametrize("layout", ["tokens", "image"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_rms_equals_nn_rmsnorm_outputs_and_gradients(layout, dtype, tol):
    ours = nb.norms.create("rms", 16, layout=layout).to(dtype)
    ref = nn.RMSNorm(16, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(4, 16, 5, 5) if layout == "image" else torch.randn(4, 7, 16)).to(dtype) * 2 + 1
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = ours(xa)
    yb = ref(xb.movedim(1, -1)).movedim(-1, 1) if layout == "image" else ref(xb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward(), (yb * w).sum().backward()
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    torch.testing.assert_close(xa.grad, xb.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=tol * 10, rtol=tol * 10)


def test_noisy_bn_per_channel_noise_is_shared_by_the_batch():
    m = nb.norms.create("noisy_bn", 3, layout="tokens", affine=False, per_sample=False, noise_scale=2.0)
    bn = nb.norms.create("bn", 3, layout="tokens", affine=False)
    x = torch.randn(6, 5, 3)
    y, z = m(x), bn(x)
    fit = torch.linalg.lstsq(torch.stack([z[..., 0].flatten(), torch.ones(30)], 1), y[..., 0].flatten()[:, None])
    scale, shift = fit.solution.flatten().tolist()
    assert 1.0 <= scale <= 2.0 + 1e-5 and abs(shift) <= 0.5 + 1e-5
    torch.testing.assert_close(y[..., 0], z[..., 0] * scale + shift, atol=1e-5, rtol=1e-5)  # one draw for all


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_zero_pads_equals_where_bit_for_bit(dtype):
    from normablate.norms.masked import zero_pads

    x = torch.randn(6, 5).to(dtype)
    x[1, 2], x[3, 0], x[4, 4] = float("nan"), float("inf"), -float("inf")
    keep = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)[:, None]
    ours, ref = zero_pads(x, keep), torch.where(keep, x, torch.zeros((), dtype=dtype))
    assert ours.dtype == dtype and torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    assert not torch.signbit(ours[~keep.squeeze(1)]).any()  # +0.0 at pads
    expanded = torch.ones(6, 1, dtype=dtype).expand(6, 5)  # stride-0 gradients, as from .sum().backward()
    assert torch.equal(zero_pads(expanded, keep), torch.where(keep, expanded, torch.zeros((), dtype=dtype)))


# ---------------------------------------------------------------- noisy_bn: the fused kernel (_NoisyBatchNormFn)
def _noisy_reference(m, x: torch.Tensor, ref_bn: nn.Module, seed: int) -> torch.Tensor:
    """noisy_bn's documented training math, composed from PyTorch ops: nn.BatchNorm, then y * s + m with the same
    draw of U(0, 1) (one (2, *noise_shape) tensor: scale, then shift)."""
    tokens = m.layout == "tokens"
    c_dim = x.dim() - 1 if tokens else 1
    y = ref_bn(x.reshape(-1, x.shape[-1])).view(x.shape) if tokens and x.dim() > 2 else ref_bn(x)
    shape = [1] * x.dim()
    shape[c_dim] = x.shape[c_dim]
    if m.per_sample:
        shape[0] = x.shape[0]
    torch.manual_seed(seed)
    u = torch.rand((2, *shape), dtype=x.dtype)
    return y * (1.0 + (m.noise_scale - 1.0) * u[0]) + (2.0 * u[1] - 1.0) * m.noise_mean


def _count_apply(monkeypatch, fn: type) -> list[int]:
    """Counts calls of a fused kernel's ``fn.apply`` (which path a forward took)."""
    calls = [0]
    apply = fn.apply

    def counted(*a):
        calls[0] += 1
        return apply(*a)

    monkeypatch.setattr(fn, "apply", counted)
    return calls


def _count_fused(monkeypatch) -> list[int]:
    from normablate.norms import batch

    return _count_apply(monkeypatch, batch._NoisyBatchNormFn)


@pytest.mark.parametrize("layout,shape", [("image", (6, 4, 5, 3)), ("tokens", (5, 7, 4)), ("image", (9, 4)),
                                          ("tokens", (9, 4))])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_noisy_bn_fused_equals_bn_then_noise(monkeypatch, layout, shape, per_sample, affine, dtype, tol, momentum):
    """Outputs, input/weight/bias gradients and running statistics of the fused training kernel equal nn.BatchNorm
    followed by the noise affine with the same random draws, over three steps (momentum None: cumulative)."""
    calls = _count_fused(monkeypatch)
    m = nb.norms.create("noisy_bn", 4, layout=layout, per_sample=per_sample, affine=affine, momentum=momentum,
                        noise_mean=0.5, noise_scale=2.0).to(dtype)
    ref = (nn.BatchNorm2d if layout == "image" and len(shape) == 4 else nn.BatchNorm1d)(
        4, affine=affine, momentum=momentum).to(dtype)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1.0, 1.0)
        ref.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = (torch.randn(*shape, generator=g) * (1.0 + 0.25 * step) + 0.5).to(dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        torch.manual_seed(10 + step)
        ya = m(xa)
        yb = _noisy_reference(m, xb, ref, seed=10 + step)
        w = torch.randn(ya.shape, generator=g).to(dtype)
        (ya * w).sum().backward(), (yb * w).sum().backward()
        torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
        torch.testing.assert_close(xa.grad, xb.grad, atol=tol, rtol=tol)
        if affine:  # sums over every value of a channel: compared relative to their size
            torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=tol * 10, rtol=tol * 10)
            torch.testing.assert_close(m.bias.grad, ref.bias.grad, atol=tol * 10, rtol=tol * 10)
        torch.testing.assert_close(m.running_mean, ref.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(m.running_var, ref.running_var, atol=tol, rtol=tol)
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    assert calls[0] == 3, "the fused kernel must be the path taken here"


def test_noisy_bn_fused_function_gradcheck():
    from normablate.norms.batch import _NoisyBatchNormFn

    g = torch.Generator().manual_seed(2)
    for tokens, shape, noise in ((False, (3, 2, 4), (3, 2, 1)), (True, (3, 4, 2), (3, 1, 2)),
                                 (False, (3, 2, 4), (1, 2, 1))):
        x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        w = (torch.rand(2, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
        b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
        s = torch.rand(*noise, dtype=torch.float64, generator=g) + 1.0
        sh = torch.rand(*noise, dtype=torch.float64, generator=g)
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: _NoisyBatchNormFn.apply(a, ww, bb, s, sh, None, None, 0.1, 1e-5, tokens), (x, w, b))


def test_noisy_bn_image_statistics_stay_exact_with_a_large_mean():
    """The image kernel's own two-pass statistics (not PyTorch's) against float64 BN, on fp32 data far from 0."""
    m = nb.norms.create("noisy_bn", 3, noise_mean=0.0, noise_scale=1.0)  # noise off in distribution: s = 1, m = 0
    ref = nn.BatchNorm2d(3).double()
    x = torch.randn(8, 3, 16, 16) * 0.1 + 100.0
    y = m(x)
    torch.testing.assert_close(y.double(), ref(x.double()), atol=2e-3, rtol=0)  # fp32 BN itself: same error size
    torch.testing.assert_close(m.running_var.double(), ref.running_var, atol=0, rtol=1e-5)
    torch.testing.assert_close(m.running_mean.double(), ref.running_mean, atol=0, rtol=1e-6)


def test_noisy_bn_sync_active_takes_the_synchronized_path(monkeypatch):
    """With sync on under a (faked) process group the statistics must come from sync.batch_norm, not the fused
    kernel; outside a real group that is the local computation, so both paths give the same numbers."""
    from normablate.norms import batch

    calls = _count_fused(monkeypatch)
    fused = nb.norms.create("noisy_bn", 4, layout="tokens", sync=True)
    synced = copy.deepcopy(fused)
    x = torch.randn(3, 5, 4) * 2 + 1
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(5)
    ya = fused(xa)
    assert calls[0] == 1
    used = []
    real_sync = batch.sync_batch_norm
    monkeypatch.setattr(batch, "sync_active", lambda *a: True)
    monkeypatch.setattr(batch, "sync_batch_norm", lambda *a, **k: used.append(1) or real_sync(*a, **k))
    torch.manual_seed(5)
    yb = synced(xb)
    assert calls[0] == 1 and used == [1], "sync active: the old composed path through sync.batch_norm"
    w = torch.randn_like(ya)
    (ya * w).sum().backward(), (yb * w).sum().backward()
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.running_var, synced.running_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["eval", "noise_off", "channels_last", "bf16"])
def test_noisy_bn_paths_without_the_fused_kernel(monkeypatch, case):
    """Eval, noise switched off, non-contiguous input and low precision keep the composed path (no fused call) and
    its results: BN times E[s]; plain BN; BN then noise."""
    calls = _count_fused(monkeypatch)
    m = nb.norms.create("noisy_bn", 4, noise_mean=0.5, noise_scale=2.0)
    ref = nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3) + 1
    if case == "eval":
        m.eval(), ref.eval()
        torch.testing.assert_close(m(x), ref(x) * 1.5, atol=1e-6, rtol=1e-6)
    elif case == "noise_off":
        m.noise_enabled = False
        torch.testing.assert_close(m(x), ref(x), atol=1e-6, rtol=1e-6)
    elif case == "channels_last":
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(3)
        y = m(xc)
        torch.testing.assert_close(y, _noisy_reference(m, x, ref, seed=3), atol=1e-6, rtol=1e-6)
    else:
        m.bfloat16()
        torch.manual_seed(3)
        y = m(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), _noisy_reference(m, x.bfloat16(), ref.bfloat16(), seed=3).float(),
                                   atol=0.05, rtol=0.02)  # bf16: the two op orders round differently
    torch.testing.assert_close(m.running_mean.float(), ref.running_mean.float(), atol=1e-2, rtol=1e-2)
    assert calls[0] == 0


def test_noisy_bn_fused_output_takes_an_inplace_op():
    """The fused kernel's output is an ordinary tensor: an inplace ReLU after it (as in VGG/ResNet) is allowed and
    its gradient is that of the composed module."""
    m = nb.norms.create("noisy_bn", 4)
    ref = copy.deepcopy(m)
    ref._fused_ok = lambda x: False
    x = torch.randn(3, 4, 5, 5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(0)
    ya = torch.relu_(m(xa))
    torch.manual_seed(0)
    yb = torch.relu_(ref(xb))
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- batch_renorm: the fused kernel (_RenormFn)
def _count_renorm_fused(monkeypatch) -> list[int]:
    from normablate.norms import renorm

    return _count_apply(monkeypatch, renorm._RenormFn)


def _renorm_definition(m, x: torch.Tensor, c_dim: int) -> torch.Tensor:
    """Ioffe (2017), composed from PyTorch ops: r and d from the batch and the running statistics, no gradient."""
    dims = tuple(d for d in range(x.dim()) if d != c_dim)
    shape = [1] * x.dim()
    shape[c_dim] = -1
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    std = torch.sqrt(var + m.eps)
    r_max, d_max = m.limits()
    with torch.no_grad():
        running_std = torch.sqrt(m.running_var + m.eps)
        r = (std / running_std).clamp(1.0 / r_max.to(x.dtype), r_max.to(x.dtype))
        d = ((mean - m.running_mean) / running_std).clamp(-d_max.to(x.dtype), d_max.to(x.dtype))
    y = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
    return y * m.weight.view(shape) + m.bias.view(shape) if m.affine else y


@pytest.mark.parametrize("layout,shape", [("image", (6, 4, 5, 3)), ("tokens", (5, 7, 4)), ("image", (9, 4))])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_renorm_fused_equals_its_definition(monkeypatch, layout, shape, affine, dtype, tol, momentum):
    """With r and d clipped (r_max 1.5, d_max 0.3 from the first step) the fused kernel's outputs, gradients and
    running statistics equal the paper's formula composed from PyTorch ops, step after step."""
    calls = _count_renorm_fused(monkeypatch)
    kw = dict(r_max=1.5, d_max=0.3, warmup_steps=0, r_max_steps=0, d_max_steps=0, momentum=momentum)
    m = nb.norms.create("batch_renorm", 4, layout=layout, affine=affine, **kw).to(dtype)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1.0, 1.0)
    ref = copy.deepcopy(m)
    c_dim = len(shape) - 1 if layout == "tokens" else 1
    g = torch.Generator().manual_seed(0)
    clipped = 0
    for step in range(3):
        x = (torch.randn(*shape, generator=g) * (1.0 + 0.7 * step) + 0.5 * step).to(dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yb = _renorm_definition(ref, xb, c_dim)
        ya = m(xa)
        with torch.no_grad():  # the reference module's running statistics, updated as BN does (unbiased var)
            dims = tuple(d for d in range(x.dim()) if d != c_dim)
            n = x.numel() // x.shape[c_dim]
            r_raw = ((x.var(dims, unbiased=False) + ref.eps) / (ref.running_var + ref.eps)).sqrt()
            d_raw = (x.mean(dims) - ref.running_mean) / (ref.running_var + ref.eps).sqrt()
            clipped += int(((r_raw > 1.5) | (r_raw < 1 / 1.5) | (d_raw.abs() > 0.3)).any())
            ref.num_batches_tracked.add_(1)
            mom = 1.0 / float(ref.num_batches_tracked) if momentum is None else momentum
            ref.running_mean.lerp_(x.mean(dims), mom)
            ref.running_var.lerp_(x.var(dims, unbiased=False) * (n / (n - 1)), mom)
        w = torch.randn(ya.shape, generator=g).to(dtype)
        (ya * w).sum().backward(), (yb * w).sum().backward()
        torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
        torch.testing.assert_close(xa.grad, xb.grad, atol=tol, rtol=tol)
        if affine:
            torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=tol * 10, rtol=tol * 10)
            torch.testing.assert_close(m.bias.grad, ref.bias.grad, atol=tol * 10, rtol=tol * 10)
        torch.testing.assert_close(m.running_mean, ref.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(m.running_var, ref.running_var, atol=tol, rtol=tol)
    assert int(m.renorm_step) == 3 and int(m.num_batches_tracked) == 3
    assert calls[0] == 3
    assert clipped, "the data must make r or d clip, or the test does not test the renormalization"


def test_batch_renorm_fused_function_gradcheck():
    from normablate.norms.renorm import _RenormFn

    g = torch.Generator().manual_seed(4)
    for image, shape in ((True, (3, 2, 4)), (False, (7, 2))):
        x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        w = (torch.rand(2, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
        b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
        # r and d carry no gradient by definition; the numerical Jacobian agrees only where both are clipped
        # (constant): running var 0.01 -> r = r_max, running mean +-10 -> d = +-d_max
        rm, rv = torch.tensor([10.0, -10.0], dtype=torch.float64), torch.tensor([0.01, 0.01], dtype=torch.float64)
        lim = torch.tensor(1.2, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: _RenormFn.apply(a, ww, bb, rm, rv, *lim, 1e-5, image)[0], (x, w, b))


@pytest.mark.parametrize("case", ["sync_active", "channels_last", "bf16"])
def test_batch_renorm_paths_without_the_fused_kernel(monkeypatch, case):
    """Synchronized statistics (faked process group: the local computation), non-contiguous input and low
    precision keep the composed path, with the fused kernel's results."""
    from normablate.norms import renorm

    calls = _count_renorm_fused(monkeypatch)
    kw = dict(r_max=1.5, d_max=0.3, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    fused = nb.norms.create("batch_renorm", 4, sync=True, **kw)
    other = copy.deepcopy(fused)
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    ya = fused(x)
    assert calls[0] == 1
    if case == "sync_active":
        monkeypatch.setattr(renorm, "sync_active", lambda *a: True)
        yb = other(x)
    elif case == "channels_last":
        yb = other(x.contiguous(memory_format=torch.channels_last))
    else:
        other.bfloat16()
        yb = other(x.bfloat16()).float()
    assert calls[0] == 1, "this case must take the composed path"
    tol = 0.05 if case == "bf16" else 1e-6
    torch.testing.assert_close(yb, ya, atol=tol, rtol=tol)
    torch.testing.assert_close(other.running_var.float(), fused.running_var, atol=tol, rtol=tol)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
def test_batch_renorm_compiled_gradients_equal_eager(monkeypatch, fused):
    """Under torch.compile the training forward runs eagerly (compiled, AOTAutograd's backward recomputed r and d
    from the running buffers after their in-place update: wrong input/weight gradients, right outputs). Three
    steps inside the warm-up (r_max, d_max still relaxing), momentum 0.1: outputs, every gradient and the
    running statistics equal eager's."""
    from normablate.norms import renorm

    if not fused:
        monkeypatch.setattr(renorm.BatchRenorm, "_fused_ok", lambda self, x: False)
    torch._dynamo.reset()
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=1, r_max_steps=6, d_max_steps=6, momentum=0.1)
    eager = nb.norms.create("batch_renorm", 8, **kw).double()
    with torch.no_grad():
        eager.running_mean.normal_()
        eager.running_var.uniform_(0.5, 2.0)
        eager.weight.uniform_(0.5, 1.5)
    comp = copy.deepcopy(eager)
    compiled = torch.compile(comp, backend="aot_eager")
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5, dtype=torch.float64) * 2 + 0.5
        w = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = eager(xa), compiled(xb)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(yb, ya, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(comp.weight.grad, eager.weight.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(comp.bias.grad, eager.bias.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(comp.running_var, eager.running_var, atol=1e-12, rtol=1e-12)
    assert int(comp.renorm_step) == int(eager.renorm_step) == 3
