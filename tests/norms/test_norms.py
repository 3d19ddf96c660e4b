"""Every norm against PyTorch's (or timm's) own layer, and masked BN against BN on the real tokens alone."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import LayerNorm2d
from torch import nn

import normablate as nb
from support.helpers import padded

TOL = dict(atol=1e-6, rtol=1e-6)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _step_both(ours, ref, x, ours_in=lambda t: t, ref_in=lambda t: t, out_back=lambda t: t):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya = ours(ours_in(xa))
    yb = out_back(ref(ref_in(xb)))
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(ya, yb, **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    ga, gb = _grads(ours), _grads(ref)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], **TOL)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_bn_image_equals_batchnorm2d(momentum):
    ours = nb.norms.create("bn", 6, layout="image", momentum=momentum)
    ref = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    for step in range(4):
        ours.zero_grad(), ref.zero_grad()
        _step_both(ours, ref, torch.randn(8, 6, 5, 5) * (step + 1) + step)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    ours.eval(), ref.eval()
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_bn_tokens_equals_batchnorm1d():
    ours = nb.norms.create("bn", 7, layout="tokens")
    ref = nn.BatchNorm1d(7)
    for _ in range(3):
        ours.zero_grad(), ref.zero_grad()
        _step_both(ours, ref, torch.randn(4, 9, 7) * 3 + 1,
                   ref_in=lambda t: t.transpose(1, 2), out_back=lambda t: t.transpose(1, 2))
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    ours.eval(), ref.eval()
    x = torch.randn(2, 9, 7)
    torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2), **TOL)


def test_bn_running_var_is_unbiased_with_pytorch_momentum():
    bn = nb.norms.create("bn", 1, layout="tokens", momentum=0.1)
    x = torch.tensor([[[1.0], [2.0], [4.0]]])  # one channel, three values
    bn(x)
    assert bn.running_mean.item() == pytest.approx(0.9 * 0 + 0.1 * (7 / 3))
    assert bn.running_var.item() == pytest.approx(0.9 * 1 + 0.1 * torch.tensor([1.0, 2.0, 4.0]).var().item())


def test_bn_options_affine_eps():
    bn = nb.norms.create("bn", 4, affine=False, eps=1e-3)
    assert bn.weight is None and bn.bias is None and bn.eps == 1e-3
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(bn(x), nn.BatchNorm2d(4, affine=False, eps=1e-3)(x), **TOL)


def test_ln_tokens_equals_layernorm():
    ours, ref = nb.norms.create("ln", 8, layout="tokens"), nn.LayerNorm(8)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    _step_both(ours, ref, torch.randn(3, 5, 8) * 2 + 1)


def test_ln_image_equals_timm_layernorm2d():
    ours, ref = nb.norms.create("ln", 8, layout="image"), LayerNorm2d(8, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    _step_both(ours, ref, torch.randn(3, 8, 4, 4) * 2 + 1)


@pytest.mark.parametrize("layout", ["tokens", "image"])
def test_rms_equals_torch_rmsnorm(layout):
    ours = nb.norms.create("rms", 8, layout=layout)
    ref = nn.RMSNorm(8, eps=1e-6)
    assert ours.eps == 1e-6  # eps inside the root, DESIGN default
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 8) * 2 + 1
    if layout == "image":
        x = torch.randn(3, 8, 4, 4)
        _step_both(ours, ref, x, ref_in=lambda t: t.permute(0, 2, 3, 1), out_back=lambda t: t.permute(0, 3, 1, 2))
    else:
        _step_both(ours, ref, x)


def test_rms_formula_eps_inside_root():
    x = torch.tensor([[[3.0, 4.0]]])
    rms = nb.norms.create("rms", 2, layout="tokens", eps=1.0, affine=False)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1.0)
    torch.testing.assert_close(rms(x), expected)


@pytest.mark.parametrize("channels,groups", [(8, 2), (16, 4), (32, 8), (64, 16), (128, 32), (192, 32), (3, 1)])
def test_gn_default_groups_keep_four_channels_per_group(channels, groups):
    assert nb.norms.create("gn", channels).num_groups == groups


@pytest.mark.parametrize("groups", [None, 2, 8])
def test_gn_equals_groupnorm(groups):
    ours = nb.norms.create("gn", 8, layout="image", **({} if groups is None else {"num_groups": groups}))
    ref = nn.GroupNorm(ours.num_groups, 8)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    _step_both(ours, ref, torch.randn(3, 8, 4, 4) * 2 + 1)


def test_gn_tokens_groups_per_token():
    ours = nb.norms.create("gn", 8, layout="tokens", num_groups=2)
    ref = nn.GroupNorm(2, 8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), ref(x.reshape(15, 8)).reshape(3, 5, 8), **TOL)
    # a token's output depends on that token only
    y1 = ours(x)
    x2 = x.clone()
    x2[:, 1:] = 100.0
    torch.testing.assert_close(ours(x2)[:, 0], y1[:, 0], **TOL)


def test_none_is_true_identity():
    m = nb.norms.create("none", 8)
    x = torch.randn(2, 8, 3, 3)
    assert m(x) is x
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    assert not nb.norms.is_norm(m)


def test_noisy_bn_noise_changes_each_step_and_eval_is_expected_transform():
    m = nb.norms.create("noisy_bn", 4, noise_mean=0.5, noise_scale=2.0)
    x = torch.randn(16, 4, 3, 3)
    y1, y2 = m(x), m(x)
    assert not torch.allclose(y1, y2)
    m.eval()
    # running stats saw the same x twice: compare against a BN fed the same two steps
    ref = nb.norms.create("bn", 4)
    ref(x), ref(x)
    ref.eval()
    torch.testing.assert_close(m(x), ref(x) * 1.5, **TOL)  # E[s] = (1 + 2) / 2, E[m] = 0


def test_noisy_bn_noise_distribution_per_sample_and_channel():
    """Recover each (sample, channel)'s scale s and shift m from y = z * s + m (z: plain BN output)."""
    m = nb.norms.create("noisy_bn", 3, affine=False, noise_mean=0.5, noise_scale=2.0)
    bn = nb.norms.create("bn", 3, affine=False)
    scales, shifts = [], []
    for _ in range(50):
        x = torch.randn(8, 3, 6, 6)
        y, z = m(x), bn(x)
        s = y.std(dim=(2, 3)) / z.std(dim=(2, 3))  # (N, C)
        scales.append(s)
        shifts.append(y.mean(dim=(2, 3)) - s * z.mean(dim=(2, 3)))
    s, sh = torch.cat(scales), torch.cat(shifts)
    assert s.min() >= 1 - 1e-4 and s.max() <= 2 + 1e-4 and abs(s.mean() - 1.5) < 0.05
    assert sh.abs().max() <= 0.5 + 1e-4 and abs(sh.mean()) < 0.05 and sh.std() > 0.2
    assert s[:8].std(dim=0).min() > 0.05  # different draws for different samples of one batch


# ---------------------------------------------------------------- masked BatchNorm
def test_masked_bn_all_true_mask_equals_bn():
    x = torch.randn(3, 6, 5)
    mbn, bn = nb.norms.create("masked_bn", 5, layout="tokens"), nb.norms.create("bn", 5, layout="tokens")
    mask = torch.ones(3, 6, dtype=torch.bool)
    for _ in range(3):
        torch.testing.assert_close(mbn(x, mask=mask), bn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mbn.running_mean, bn.running_mean, **TOL)
    torch.testing.assert_close(mbn.running_var, bn.running_var, **TOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_masked_bn_equals_bn_on_real_tokens(dtype, tol):
    x, mask = padded()
    x = x.to(dtype)
    mbn = nb.norms.create("masked_bn", 5, layout="tokens").to(dtype)
    ref = nn.BatchNorm1d(5).to(dtype)
    with torch.no_grad():
        mbn.weight.uniform_(0.5, 1.5), mbn.bias.uniform_(-1, 1)
    ref.load_state_dict(mbn.state_dict())
    for step in range(3):
        xs = (x * (step + 1)).detach()
        xa = xs.clone().requires_grad_(True)
        xb = xs[mask].clone().requires_grad_(True)  # (M, C): real tokens alone
        ya, yb = mbn(xa, mask=mask), ref(xb)
        w = torch.randn_like(yb)
        (ya[mask] * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(ya[mask], yb, atol=tol, rtol=tol)
        torch.testing.assert_close(xa.grad[mask], xb.grad, atol=tol, rtol=tol)
        assert (xa.grad[~mask] == 0).all() and (ya[~mask] == 0).all()
        torch.testing.assert_close(mbn.weight.grad, ref.weight.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(mbn.bias.grad, ref.bias.grad, atol=tol, rtol=tol)
        mbn.zero_grad(), ref.zero_grad()
    torch.testing.assert_close(mbn.running_mean, ref.running_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(mbn.running_var, ref.running_var, atol=tol, rtol=tol)
    # eval uses running stats (the same as BN's)
    mbn.eval(), ref.eval()
    torch.testing.assert_close(mbn(x, mask=mask)[mask], ref(x[mask]), atol=tol, rtol=tol)


def test_masked_bn_pad_values_change_nothing():
    x, mask = padded()
    a = nb.norms.create("masked_bn", 5, layout="tokens").double()
    b = copy.deepcopy(a)
    x2 = x.clone()
    x2[~mask] = 1e4 * torch.randn(int((~mask).sum()), 5, dtype=torch.float64)
    torch.testing.assert_close(a(x, mask=mask), b(x2, mask=mask), atol=0, rtol=0)
    torch.testing.assert_close(a.running_mean, b.running_mean, atol=0, rtol=0)
    torch.testing.assert_close(a.running_var, b.running_var, atol=0, rtol=0)


def test_masked_bn_non_finite_pad_does_not_leak():
    x, mask = padded()
    a = nb.norms.create("masked_bn", 5, layout="tokens").double()
    b = copy.deepcopy(a)
    x2 = x.clone()
    x2[~mask] = float("inf")
    x2[0, -1] = float("nan") if not mask[0, -1] else x2[0, -1]
    torch.testing.assert_close(a(x, mask=mask), b(x2, mask=mask), atol=0, rtol=0)
    assert torch.isfinite(b.running_var).all()


def test_masked_bn_all_pad_batch_no_nan_no_update():
    m = nb.norms.create("masked_bn", 5, layout="tokens")
    m(torch.randn(4, 6, 5), mask=torch.ones(4, 6, dtype=torch.bool))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = m(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_masked_bn_unmasked_bn_is_polluted_by_padding():
    """The reason masked BN exists: plain BN's output on real tokens depends on the pad values."""
    x, mask = padded()
    x2 = x.clone()
    x2[~mask] = 5.0
    bn = nb.norms.create("bn", 5, layout="tokens").double()
    assert not torch.allclose(bn(x)[mask], bn(x2)[mask])


# ---------------------------------------------------------------- registry and errors
def test_available_lists_required_norms():
    assert {"bn", "masked_bn", "ln", "rms", "gn", "noisy_bn", "none"} <= set(nb.norms.available())


def test_unknown_norm_lists_valid():
    with pytest.raises(nb.ConfigError, match=r"unknown norm 'layernorm'.*valid: batch_renorm, bn, dyt, gn, ln"):
        nb.norms.create("layernorm", 4)
    with pytest.raises(nb.ConfigError, match=r"did you mean 'rms'"):
        nb.norms.create("rmss", 4)


def test_unknown_norm_option_lists_valid():
    with pytest.raises(nb.ConfigError, match=r"norm 'bn' got unknown option\(s\) momentun; valid: affine, eps, ghost_batch_size, momentum"):
        nb.norms.create("bn", 4, momentun=0.1)


def test_norm_by_import_path():
    m = nb.norms.create("torch.nn:LayerNorm", 6, layout="tokens")
    assert isinstance(m, nn.LayerNorm)
    with pytest.raises(nb.ConfigError, match="has no attribute 'Nope'"):
        nb.norms.create("torch.nn:Nope", 6)


def test_bn_one_value_per_channel_is_a_clear_error():
    bn = nb.norms.create("bn", 4)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(torch.randn(1, 4, 1, 1))
    bn.eval()
    assert bn(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)  # fine in eval


def test_duplicate_registration_rejected():
    with pytest.raises(nb.ConfigError, match="already registered"):
        nb.norms.register("bn", lambda c, layout="image": nn.Identity())
