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
