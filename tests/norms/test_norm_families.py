"""DyT, PowerNorm and Batch Renormalization against their definitions and the authors' code; Peri-LN placement
and QK-norm in the Transformer LM and the ViT.

The fixture ``tests/fixtures/recent_norms_reference.pt`` holds inputs, outputs, gradients and running statistics
produced by the authors' own implementations, run outside this repository (no code of theirs is in it):

- DyT: github.com/jiachenzhu/DyT @ aab5dde0bc1bdd4410f687dad404c87b31808f90, ``dynamic_tanh.py``, unchanged.
- PowerNorm: github.com/sIncerass/powernorm @ 9ea6226a3203d5d6fcee07a5c6dec38ec6bc5e9f,
  ``fairseq/modules/norms/mask_powernorm.py`` with one compatibility edit (``ctx.saved_variables`` ->
  ``ctx.saved_tensors``, gone from current PyTorch). Inputs (T, B, C), ``pad_mask`` (B, T) True = pad, float64,
  4 training steps then one eval batch, for three set-ups: its default group scaling (2 groups, warm-up 2),
  and its ``gp`` module replaced by identity (Algorithm 1 alone) without padding (warm-up 1) and with padding
  (warm-up 2).

Produced by (with the two files above copied into /tmp/ref): ``cd /tmp/ref && python gen_fixtures.py``; the
script seeds torch with 0, builds each module in float64, sets gamma ~ U(0.5, 1.5), beta ~ U(-1, 1), feeds
randn inputs, back-propagates ``(y * w).sum()`` for a randn ``w`` and saves every tensor (torch.save).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import normablate as nb
from support.helpers import lm_padding_pair, padded

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "recent_norms_reference.pt"
F64 = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=True)


# ================================================================ DyT
@pytest.mark.parametrize("layout", ["tokens", "image"])
def test_dyt_matches_authors_code(reference, layout):
    ref = reference["dyt"][layout]
    m = nb.norms.create("dyt", 6, layout=layout, alpha_init=ref["alpha_init"]).double()
    assert m.alpha.shape == (1,) and m.alpha.item() == pytest.approx(ref["alpha_init"], rel=1e-7)  # float32 init
    with torch.no_grad():
        m.weight.copy_(ref["weight"]), m.bias.copy_(ref["bias"])
    x = ref["x"].clone().requires_grad_(True)
    y = m(x)
    (y * ref["w"]).sum().backward()
    torch.testing.assert_close(y, ref["y"], **F64)
    torch.testing.assert_close(x.grad, ref["x_grad"], **F64)
    for name in ("alpha", "weight", "bias"):
        torch.testing.assert_close(getattr(m, name).grad, ref[f"{name}_grad"], **F64)


def test_dyt_formula_default_alpha_and_options():
    x = torch.randn(2, 3, 4)
    m = nb.norms.create("dyt", 4, layout="tokens")
    assert m.alpha.item() == 0.5  # the paper's default
    torch.testing.assert_close(m(x), torch.tanh(0.5 * x))
    m = nb.norms.create("dyt", 4, layout="tokens", per_channel_alpha=True, alpha_init=0.7, bias=False)
    assert m.alpha.shape == (4,) and m.bias is None
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4])), m.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(m(x), torch.tanh(x * m.alpha) * m.weight)
    img = nb.norms.create("dyt", 4, layout="image", per_channel_alpha=True)
    img.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        img.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    xi = torch.randn(2, 4, 3, 3)
    expected = torch.tanh(xi * m.alpha.view(1, 4, 1, 1)) * m.weight.view(1, 4, 1, 1) + img.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(img(xi), expected)
    bare = nb.norms.create("dyt", 4, affine=False)
    assert [n for n, _ in bare.named_parameters()] == ["alpha"]
    assert nb.norms.is_norm(bare) and list(bare.buffers()) == []


def test_dyt_has_no_batch_or_token_dependence():
    m = nb.norms.create("dyt", 5, layout="tokens")
    x = torch.randn(4, 6, 5)
    torch.testing.assert_close(m(x)[1:2, 2:3], m(x[1:2, 2:3]), atol=0, rtol=0)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_dyt_rejects_non_positive_alpha_init(value):
    with pytest.raises(nb.ConfigError, match=r"dyt: alpha_init must be a finite number > 0"):
        nb.norms.create("dyt", 4, alpha_init=value)


# ================================================================ PowerNorm
def _pn_like(rec, warmup):
    m = nb.norms.create("powernorm", 8, layout="tokens", alpha_fwd=0.9, alpha_bkw=0.9, warmup_iters=warmup,
                        group_scaling=None if rec["no_group_scaling"] else rec["group_num"]).double()
    with torch.no_grad():
        m.weight.copy_(rec["weight"]), m.bias.copy_(rec["bias"])
    return m


@pytest.mark.parametrize("setup", ["grouped_warmup2", "plain_warmup1", "plain_padded_warmup2"])
def test_powernorm_matches_authors_code(reference, setup):
    """Forward, running statistics, the gradient statistic nu and the gradients, step by step.

    Documented differences (module docstring): the reference's ``ema_gz`` is ``nu / (1 - alpha_bkw)``; after
    warm-up its backward divides by the batch psi_B where the paper (and we) divide by psi_{t-1}, so there our
    dL/dx = its dL/dx * psi_B / psi_{t-1} (checked where no group scaling sits in between); with padding its
    nu and parameter gradients also count padded positions, so there only forward and running stats compare.
    """
    rec = reference["powernorm"][setup]
    m = _pn_like(rec, rec["warmup"])
    pad = rec["pad_mask"]
    mask = None if pad is None else ~pad  # (B, T) True = real
    real = torch.ones(7, 4, dtype=torch.bool) if pad is None else ~pad.T  # (T, B)
    prev_phi = torch.ones(8, dtype=torch.float64)
    for i, s in enumerate(rec["steps"], start=1):
        x = s["x"].transpose(0, 1).clone().requires_grad_(True)  # (T, B, C) -> (B, T, C)
        y = m(x, mask=mask)
        (y * s["w"].transpose(0, 1)).sum().backward()
        torch.testing.assert_close(y.transpose(0, 1)[real], s["y"][real], **F64)
        torch.testing.assert_close(m.running_phi, s["running_phi"], **F64)
        if pad is None:
            torch.testing.assert_close(m.running_nu, 0.1 * s["ema_gz"], **F64)
            torch.testing.assert_close(m.weight.grad, s["weight_grad"], **F64)
            torch.testing.assert_close(m.bias.grad, s["bias_grad"], **F64)
            grad = x.grad.transpose(0, 1)
            if i <= rec["warmup"]:
                torch.testing.assert_close(grad, s["x_grad"], **F64)
            elif rec["no_group_scaling"]:
                psi_b2 = s["x"].pow(2).mean(dim=(0, 1))
                expected = s["x_grad"] * torch.sqrt(psi_b2 + 1e-5) / torch.sqrt(prev_phi + 1e-5)
                torch.testing.assert_close(grad, expected, **F64)
            assert not torch.allclose(grad, torch.zeros_like(grad))
        prev_phi = s["running_phi"]
        m.zero_grad()
    m.eval()
    y = m(rec["eval_x"].transpose(0, 1), mask=mask)
    torch.testing.assert_close(y.transpose(0, 1)[real], rec["eval_y"][real], **F64)


def test_powernorm_forward_after_warmup_uses_previous_running_stat():
    m = nb.norms.create("powernorm", 3, layout="tokens", warmup_iters=0, affine=False).double()
    phi = torch.tensor([4.0, 9.0, 16.0], dtype=torch.float64)
    with torch.no_grad():
        m.running_phi.copy_(phi)
    x = torch.randn(5, 6, 3, dtype=torch.float64) * 10
    y = m(x)
    torch.testing.assert_close(y, x / torch.sqrt(phi + 1e-5), **F64)
    expected_phi = 0.9 * phi + 0.1 * x.pow(2).mean(dim=(0, 1))  # no mean subtracted
    torch.testing.assert_close(m.running_phi, expected_phi, **F64)
    m.eval()
    torch.testing.assert_close(m(x), x / torch.sqrt(expected_phi + 1e-5), **F64)


def test_powernorm_approximate_backward_formula():
    """dL/dx = (g - nu z) / psi, nu <- nu + (1 - a_b) mean((g - nu z) z), on a hand-set state."""
    m = nb.norms.create("powernorm", 2, layout="tokens", warmup_iters=0, alpha_bkw=0.8).double()
    with torch.no_grad():
        m.running_phi.copy_(torch.tensor([4.0, 0.25]))
        m.running_nu.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
        m.weight.copy_(torch.tensor([2.0, 0.5]))
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 2, dtype=torch.float64)
    (m(x) * w).sum().backward()
    psi = torch.sqrt(torch.tensor([4.0, 0.25], dtype=torch.float64) + 1e-5)
    z = x.detach() / psi
    g = w * torch.tensor([2.0, 0.5], dtype=torch.float64)
    g_approx = g - torch.tensor([0.3, -0.2], dtype=torch.float64) * z
    torch.testing.assert_close(x.grad, g_approx / psi, **F64)
    nu = torch.tensor([0.3, -0.2], dtype=torch.float64) + 0.2 * (g_approx * z).mean(dim=(0, 1))
    torch.testing.assert_close(m.running_nu, nu, **F64)
    torch.testing.assert_close(m.weight.grad, (w * z).sum(dim=(0, 1)), **F64)


@pytest.mark.parametrize("warmup", [0, 2, 10])
@pytest.mark.parametrize("group_scaling", [None, 5])
def test_powernorm_masked_equals_real_tokens_alone(warmup, group_scaling):
    """Statistics, outputs, gradients and running state equal PowerNorm on the real tokens alone."""
    x, mask = padded()
    a = nb.norms.create("powernorm", 5, layout="tokens", warmup_iters=warmup, group_scaling=group_scaling).double()
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5), a.bias.uniform_(-1, 1)
    b = copy.deepcopy(a)
    for step in range(4):
        xs = x * (step + 1)
        xa = xs.clone().requires_grad_(True)
        xb = xs[mask][None].clone().requires_grad_(True)  # (1, M, C): the real tokens alone
        ya, yb = a(xa, mask=mask), b(xb)
        w = torch.randn_like(yb)
        (ya[mask] * w[0]).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(ya[mask], yb[0], **F64)
        assert (ya[~mask] == 0).all() and (xa.grad[~mask] == 0).all()
        torch.testing.assert_close(xa.grad[mask], xb.grad[0], **F64)
        for k in ("running_phi", "running_nu", "iters"):
            torch.testing.assert_close(getattr(a, k), getattr(b, k), **F64)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, **F64)
        a.zero_grad(), b.zero_grad()
    a.eval(), b.eval()
    torch.testing.assert_close(a(x, mask=mask)[mask], b(x[mask][None])[0], **F64)


def test_powernorm_pads_never_leak_and_all_pad_batch_changes_nothing():
    x, mask = padded()
    a = nb.norms.create("powernorm", 5, layout="tokens", warmup_iters=1).double()
    b = copy.deepcopy(a)
    x2 = x.clone()
    x2[~mask] = float("inf")
    torch.testing.assert_close(a(x, mask=mask), b(x2, mask=mask), atol=0, rtol=0)
    torch.testing.assert_close(a.running_phi, b.running_phi, atol=0, rtol=0)
    before = copy.deepcopy(a.state_dict())
    xe = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    y = a(xe, mask=torch.zeros(2, 3, dtype=torch.bool))
    y.sum().backward()
    assert (y == 0).all() and torch.isfinite(xe.grad).all()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_powernorm_image_layout_equals_tokens_layout():
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    img = nb.norms.create("powernorm", 6, layout="image", warmup_iters=1).double()
    tok = nb.norms.create("powernorm", 6, layout="tokens", warmup_iters=1).double()
    for _ in range(3):
        xa = x.clone().requires_grad_(True)
        xb = x.permute(0, 2, 3, 1).clone().requires_grad_(True)
        ya, yb = img(xa), tok(xb)
        ya.pow(3).sum().backward(), yb.pow(3).sum().backward()
        torch.testing.assert_close(ya.permute(0, 2, 3, 1), yb, **F64)
        torch.testing.assert_close(xa.grad.permute(0, 2, 3, 1), xb.grad, **F64)
    torch.testing.assert_close(img.running_nu, tok.running_nu, **F64)


def _group_scaling_as_described(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The authors' GroupScaling1D as their description reads: each token's C channels cut into ``groups``
    consecutive groups of C/G, each divided by sqrt(mean of its squares + 1e-5) (their default eps, which their
    PowerNorm never overrides). Written from the description, channels last."""
    out = torch.empty_like(x)
    width = x.shape[-1] // groups
    for g in range(groups):
        part = x[..., g * width:(g + 1) * width]
        out[..., g * width:(g + 1) * width] = part / torch.sqrt((part * part).mean(-1, keepdim=True) + 1e-5)
    return out


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_powernorm_group_scaling_uses_the_authors_fixed_eps(eps):
    """At eps 1e-3 and small activations the norm's eps inside the group RMS would change outputs by ~0.5 (issue
    26); the group scaling uses the authors' 1e-5 whatever ``eps`` is, and ``eps`` only enters psi."""
    torch.manual_seed(0)
    x = 0.02 * torch.randn(3, 5, 8, dtype=torch.float64)  # (N, T, C), mean square ~4e-4: eps matters
    m = nb.norms.create("powernorm", 8, layout="tokens", eps=eps, group_scaling=2, warmup_iters=1).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, 8)), m.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    gs = _group_scaling_as_described(x, 2)
    y = m(x)  # training, first step: warm-up divides by the batch psi_B of the group-scaled input
    psi_b2 = gs.pow(2).mean(dim=(0, 1))
    torch.testing.assert_close(y, gs / torch.sqrt(psi_b2 + eps) * m.weight + m.bias, **F64)
    m.eval()
    y = m(x)
    torch.testing.assert_close(y, gs / torch.sqrt(m.running_phi + eps) * m.weight + m.bias, **F64)
    if eps != 1e-5:  # the old behaviour (norm's eps in the group RMS) is measurably different here
        rms = torch.sqrt(x.view(3, 5, 2, 4).pow(2).mean(-1, keepdim=True) + eps)  # (N, T, G, 1)
        wrong = (x.view(3, 5, 2, 4) / rms).view(3, 5, 8)
        assert (wrong / torch.sqrt(m.running_phi + eps) * m.weight + m.bias - y).abs().max() > 0.1


@pytest.mark.parametrize("options,message", [
    ({"alpha_fwd": 1.0}, r"alpha_fwd must be in \[0, 1\)"),
    ({"alpha_bkw": -0.1}, r"alpha_bkw must be in \[0, 1\)"),
    ({"warmup_iters": -1}, r"warmup_iters must be an integer >= 0"),
    ({"group_scaling": 3}, r"group_scaling must be null or a number of groups >= 1 dividing num_features=8"),
    ({"eps": 0.0}, r"eps must be > 0"),
])
def test_powernorm_rejects_bad_options(options, message):
    with pytest.raises(nb.ConfigError, match=message):
        nb.norms.create("powernorm", 8, layout="tokens", **options)


# ================================================================ Batch Renormalization
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", ["image", "tokens"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_renorm_with_unit_limits_equals_batchnorm(dtype, tol, layout, momentum):
    ours = nb.norms.create("batch_renorm", 6, layout=layout, r_max=1.0, d_max=0.0, momentum=momentum,
                           warmup_steps=0, r_max_steps=0, d_max_steps=0).to(dtype)
    ref = (nn.BatchNorm2d if layout == "image" else nn.BatchNorm1d)(6, momentum=momentum).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    to_ref = (lambda t: t) if layout == "image" else (lambda t: t.transpose(1, 2))
    for step in range(4):
        shape = (8, 6, 5, 5) if layout == "image" else (4, 9, 6)
        x = (torch.randn(shape, dtype=dtype) * (step + 1) + step)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), to_ref(ref(to_ref(xb)))
        w = torch.randn_like(ya)
        (ya * w).sum().backward(), (yb * w).sum().backward()
        torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
        torch.testing.assert_close(xa.grad, xb.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=tol, rtol=tol)
        ours.zero_grad(), ref.zero_grad()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=tol, rtol=tol)
    assert ours.num_batches_tracked == ref.num_batches_tracked == 4
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(ours(x), to_ref(ref(to_ref(x))), atol=tol, rtol=tol)


def test_batch_renorm_r_d_clipping_by_hand():
    """Running mu = 0, sigma = 1; three channels of two values each, r_max = 2, d_max = 0.5, eps = 0.

    ch0: x = (0, 8):     mu_B = 4, sigma_B = 4   -> r = clip(4, 1/2, 2) = 2,   d = clip(4, -.5, .5) = .5
    ch1: x = (-.1, .1):  mu_B = 0, sigma_B = .1  -> r = clip(.1) = 1/2,        d = 0
    ch2: x = (-1, 1.4):  mu_B = .2, sigma_B = 1.2 -> r = 1.2 (inside),         d = .2 (inside)
    y = (x - mu_B) / sigma_B * r + d
    """
    m = nb.norms.create("batch_renorm", 3, layout="tokens", eps=0.0, affine=False, r_max=2.0, d_max=0.5,
                        warmup_steps=0, r_max_steps=0, d_max_steps=0).double()
    x = torch.tensor([[[0.0, -0.1, -1.0], [8.0, 0.1, 1.4]]], dtype=torch.float64, requires_grad=True)
    y = m(x)
    expected = torch.tensor([[[-1.5, -0.5, -1.0], [2.5, 0.5, 1.4]]], dtype=torch.float64)
    torch.testing.assert_close(y, expected, **F64)
    # no gradient through r and d: the gradient is BN's, scaled by the (constant) r
    w = torch.tensor([[[1.0, 2.0, -1.0], [3.0, 0.5, 2.0]]], dtype=torch.float64)
    (y * w).sum().backward()
    xc = x.detach().clone().requires_grad_(True)
    mean, std = xc.mean(dim=(0, 1)), xc.var(dim=(0, 1), unbiased=False).sqrt()
    ((xc - mean) / std * torch.tensor([2.0, 0.5, 1.2], dtype=torch.float64) * w).sum().backward()
    torch.testing.assert_close(x.grad, xc.grad, **F64)
    torch.testing.assert_close(m.running_mean, 0.1 * torch.tensor([4.0, 0.0, 0.2], dtype=torch.float64), **F64)


def test_batch_renorm_schedule_and_exact_resume():
    kw = dict(layout="tokens", r_max=3.0, d_max=5.0, warmup_steps=2, r_max_steps=6, d_max_steps=4)
    m = nb.norms.create("batch_renorm", 2, **kw)
    seen = []
    for _ in range(8):
        r, d = m.limits()
        seen.append((r.item(), d.item()))
        m(torch.randn(4, 3, 2))
    assert seen == [(1, 0), (1, 0), (1, 0), (1.5, 2.5), (2, 5), (2.5, 5), (3, 5), (3, 5)]
    assert m.state_dict()["renorm_step"] == 8
    m.eval()
    m(torch.randn(4, 3, 2))
    assert m.renorm_step == 8  # eval does not advance the schedule
    # resume: 5 steps in one go == 3 steps, state_dict, a fresh module, 2 more steps
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 2) * 3 + 1 for _ in range(5)]
    a = nb.norms.create("batch_renorm", 2, **kw)
    outs = [a(b) for b in batches]
    b = nb.norms.create("batch_renorm", 2, **kw)
    for x in batches[:3]:
        b(x)
    c = nb.norms.create("batch_renorm", 2, **kw)
    c.load_state_dict(b.state_dict())
    for x, expected in zip(batches[3:], outs[3:]):
        torch.testing.assert_close(c(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("options,message", [
    ({"r_max": 0.5}, r"r_max must be >= 1"),
    ({"d_max": -1.0}, r"d_max must be >= 0"),
    ({"warmup_steps": -1}, r"warmup_steps must be >= 0"),
    ({"warmup_steps": 10, "r_max_steps": 5}, r"r_max_steps=5 must be >= warmup_steps=10"),
])
def test_batch_renorm_rejects_bad_options(options, message):
    with pytest.raises(nb.ConfigError, match=message):
        nb.norms.create("batch_renorm", 4, **options)


def test_batch_renorm_masked_equals_batch_renorm_on_the_real_tokens():
    """``masked: true``: outputs, input and parameter gradients, running statistics and the step count equal
    batch_renorm applied to the real tokens alone, with r and d active (limits 2 and 1 from the first step); pads
    output 0 and get 0 gradient even when they hold inf/NaN; an all-pad batch changes nothing. Default: the mask
    is ignored, as bn ignores it."""
    torch.manual_seed(0)
    kw = dict(r_max=2.0, d_max=1.0, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    m = nb.norms.create("batch_renorm", 4, layout="tokens", masked=True, **kw).double()
    ref = nb.norms.create("batch_renorm", 4, layout="tokens", **kw).double()
    for mod in (m, ref):
        with torch.no_grad():
            mod.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0])), mod.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 1, 5])[:, None]  # (N, T) True = real
    r_seen = []
    for step in range(3):
        x = torch.randn(5, 6, 4, dtype=torch.float64) * (1 + step) + step
        x[~mask] = float("inf")
        x[1, 3, 0] = float("nan")
        w = torch.randn_like(x)
        xm = x.clone().requires_grad_(True)
        y = m(xm, mask=mask)
        (y * w).sum().backward()
        xr = x[mask].clone().requires_grad_(True)  # (M, C): the real tokens alone
        std = xr.detach().var(0, unbiased=False).add(1e-5).sqrt()
        r_seen.append((std / ref.running_var.add(1e-5).sqrt()).clamp(0.5, 2.0))
        yr = ref(xr)
        (yr * w[mask]).sum().backward()
        torch.testing.assert_close(y[mask], yr, **F64)
        torch.testing.assert_close(xm.grad[mask], xr.grad, **F64)
        assert (y[~mask] == 0).all() and (xm.grad[~mask] == 0).all()
        for a, b in ((m.weight.grad, ref.weight.grad), (m.bias.grad, ref.bias.grad), (m.running_mean,
                     ref.running_mean), (m.running_var, ref.running_var)):
            torch.testing.assert_close(a, b, **F64)
        assert int(m.renorm_step) == int(ref.renorm_step) == step + 1
    assert any((r != 1).any() for r in r_seen)  # the renormalization was active, not plain BN
    before = copy.deepcopy(m.state_dict())
    m(torch.randn(5, 6, 4, dtype=torch.float64), mask=torch.zeros(5, 6, dtype=torch.bool))  # all padding
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    m.eval(), ref.eval()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    y = m(x, mask=mask)
    torch.testing.assert_close(y[mask], ref(x[mask]), **F64)
    assert (y[~mask] == 0).all()
    plain = nb.norms.create("batch_renorm", 4, layout="tokens", **kw).double()  # default: the mask is ignored
    twin = copy.deepcopy(plain)
    torch.testing.assert_close(plain(x, mask=mask), twin(x), **F64)
    with pytest.raises(ValueError, match=r"batch_renorm \(masked\): a mask \(N, T\) needs tokens"):
        nb.norms.create("batch_renorm", 4, masked=True)(torch.randn(2, 4, 3, 3), mask=torch.ones(2, 3, dtype=bool))


def test_bad_norm_option_values_fail_at_config_time(tmp_path, capsys):
    from normablate.cli import main

    for norm, message in (("{name: batch_renorm, r_max: 0.5}", "r_max must be >= 1"),
                          ("{name: dyt, alpha_init: 0}", "alpha_init must be a finite number > 0"),
                          ("{name: powernorm, alpha_fwd: 1.5}", "alpha_fwd must be in [0, 1)")):
        assert main(["train", f"trainer.log_dir={tmp_path}", f"model.norm={norm}"]) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ================================================================ placement and QK norm in the Transformers
LM = {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16}
VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
@pytest.mark.parametrize("norm,qk_norm", [
    ("ln", "masked_bn"), ("ln", {"name": "powernorm", "warmup_iters": 0}), ("rms", "rms"), ("dyt", "dyt"),
    ({"name": "powernorm", "warmup_iters": 0}, None), ({"name": "powernorm", "warmup_iters": 5}, "ln"),
    ("masked_bn", "masked_bn"),
])
def test_lm_logits_do_not_depend_on_padding_with_qk_norm(placement, norm, qk_norm):
    """Mask-aware norms everywhere (QK norms included): real-token logits and gradients, in train and eval
    mode, are the same whether a sequence is padded to 12 or to 16 with other pad ids. Each call starts from
    the same state (PowerNorm after warm-up normalizes by the running statistic, which a call updates)."""
    torch.manual_seed(0)
    _assert_padding_invariant(nb.models.create("transformer_lm", norm=norm, qk_norm=qk_norm, norm_placement=placement,
                                               **LM).double())


@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
@pytest.mark.parametrize("norm,attn_norm", [("ln", "masked_bn"), ("masked_bn", "rms"),
                                            ({"name": "dyt", "alpha_init": 0.5}, {"name": "dyt", "alpha_init": 2})])
def test_lm_logits_do_not_depend_on_padding_with_attn_norm(placement, norm, attn_norm):
    """The same invariance with a different norm on the attention branch (the mask reaches it too)."""
    torch.manual_seed(0)
    _assert_padding_invariant(nb.models.create("transformer_lm", norm=norm, attn_norm=attn_norm,
                                               norm_placement=placement, **LM).double())


def _assert_padding_invariant(model):
    idx12, mask12, idx16, mask16 = lm_padding_pair()
    for mode in ("train", "eval"):
        a_model, b_model = copy.deepcopy(model), copy.deepcopy(model)
        getattr(a_model, mode)(), getattr(b_model, mode)()
        a = a_model(idx12, mask=mask12)
        b = b_model(idx16, mask=mask16)[:, :12]
        torch.testing.assert_close(a[mask12], b[mask12], atol=1e-10, rtol=1e-10)
        assert torch.isfinite(b).all()
        a[mask12].pow(2).sum().backward(), b[mask12].pow(2).sum().backward()
        for (name, pa), (_, pb) in zip(a_model.named_parameters(), b_model.named_parameters()):
            if name != "pos.weight":  # positions 12..15 exist only in the padded call
                torch.testing.assert_close(pa.grad, pb.grad, atol=1e-9, rtol=1e-7, msg=name)
        for (name, ba), (_, bb) in zip(a_model.named_buffers(), b_model.named_buffers()):
            torch.testing.assert_close(ba, bb, atol=1e-10, rtol=1e-10, msg=name)


def test_lm_mask_reaches_qk_norms():
    seen = []

    @nb.norms.register("spy_norm")
    class Spy(nn.Module):
        def __init__(self, num_features, layout="image"):
            super().__init__()
            self.c = num_features

        def forward(self, x, mask=None):
            seen.append((self.c, tuple(x.shape), None if mask is None else mask.clone()))
            return x

    try:
        model = nb.models.create("transformer_lm", norm="ln", qk_norm="spy_norm", **LM)
        mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
        model(torch.randint(0, 256, (2, 8)), mask=mask)
    finally:
        nb.norms.REGISTRY.unregister("spy_norm")
    assert len(seen) == 2 * LM["n_layer"]  # q and k of each block
    for c, shape, m in seen:
        assert c == 16 and shape == (2, 2 * 8, 16)  # (B, heads * T, head_dim)
        assert torch.equal(m, mask.repeat(1, 2))  # each head's tokens carry the mask


def test_qk_norm_normalizes_each_head_over_head_dim():
    for backbone, kw, x in (("transformer_lm", LM, torch.randint(0, 256, (2, 8))),
                            ("vit", VIT, torch.randn(2, 3, 32, 32))):
        model = nb.models.create(backbone, norm="ln", qk_norm={"name": "ln", "affine": False}, **kw)
        out = {}
        attn = model.blocks[0].attn
        attn.q_norm.register_forward_hook(lambda m, i, o: out.update(q=(i[0], o)))  # returns None
        model(x)
        q_in, q = out["q"]
        assert q.shape == q_in.shape and q.shape[1:2] == (2,) and q.shape[-1] == 16  # (B, h, T, head_dim)
        expected = (q_in - q_in.mean(-1, keepdim=True)) / torch.sqrt(q_in.var(-1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(q, expected, atol=1e-5, rtol=1e-5)  # each (head, token) vector on its own


@pytest.mark.parametrize("backbone", ["transformer_lm", "vit"])
def test_norm_sites_per_placement_and_qk_norm(backbone):
    kw, depth = (LM, LM["n_layer"]) if backbone == "transformer_lm" else (VIT, VIT["depth"])
    expected = {"pre": 2 * depth + 1, "post": 2 * depth, "peri": 4 * depth + 1}
    for placement, sites in expected.items():
        for qk_norm, extra in ((None, 0), ("rms", 2 * depth), ("none", 0)):
            model = nb.models.create(backbone, norm="dyt", norm_placement=placement, qk_norm=qk_norm, **kw)
            found = [m for m in model.modules() if nb.norms.is_norm(m)]
            assert len(found) == sites + extra, (placement, qk_norm)
            assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())  # no silent LN fallback


@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
def test_lm_attn_norm_sits_on_the_attention_branch_only(placement):
    """attn_norm replaces the norm before attention (and after it with peri) in every block; the MLP branch
    and the final norm keep ``norm``. Without attn_norm every site is ``norm``."""
    dyt = lambda a: {"name": "dyt", "alpha_init": a}  # noqa: E731
    split = nb.models.create("transformer_lm", norm=dyt(0.5), attn_norm=dyt(2.0), norm_placement=placement, **LM)
    plain = nb.models.create("transformer_lm", norm=dyt(0.5), norm_placement=placement, **LM)
    alphas = {n: m.alpha.item() for n, m in split.named_modules() if nb.norms.is_norm(m)}
    attn_sites = {n for n in alphas if n.rsplit(".", 1)[-1] in ("n1", "n1_out")}
    assert len(attn_sites) == LM["n_layer"] * (2 if placement == "peri" else 1)
    assert {n: a for n, a in alphas.items() if n in attn_sites} == dict.fromkeys(attn_sites, 2.0)
    assert {n: a for n, a in alphas.items() if n not in attn_sites} == dict.fromkeys(set(alphas) - attn_sites, 0.5)
    assert ("norm_f" in alphas) == (placement != "post")
    assert {n: m.alpha.item() for n, m in plain.named_modules() if nb.norms.is_norm(m)} == dict.fromkeys(alphas, 0.5)
    mixed = nb.models.create("transformer_lm", norm="ln", attn_norm="masked_bn", norm_placement=placement, **LM)
    kinds = {n: type(m).__name__ for n, m in mixed.named_modules() if nb.norms.is_norm(m)}
    kind = lambda name: type(nb.norms.create(name, 8, layout="tokens")).__name__  # noqa: E731
    assert {kinds[n] for n in attn_sites} == {kind("masked_bn")} != {kind("ln")}
    assert {k for n, k in kinds.items() if n not in attn_sites} == {kind("ln")}


@pytest.mark.parametrize("key", ["attn_norm", "qk_norm"])
@pytest.mark.parametrize("bad,why", [("bogus", r"unknown norm 'bogus'; valid: .*dyt"),
                                     ({"name": "dyt", "alpha": 2}, r"unknown option\(s\) alpha; valid: .*alpha_init"),
                                     ({"name": "dyt", "alpha_init": 0}, r"cannot be built"),  # fails when built
                                     ({"name": "gn", "num_groups": 5}, r"cannot be built"), (0, r"norm must be")])
def test_lm_bad_norm_option_is_a_config_error_naming_the_key(key, bad, why):
    with pytest.raises(nb.ConfigError, match=rf"^model\.{key}=.*: .*{why}"):
        nb.models.create("transformer_lm", norm="ln", **{key: bad}, **LM)


@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
def test_lm_attention_reads_the_attn_norm_and_the_mlp_the_norm(placement):
    """The data path, not only the module names: with attn_norm (DyT alpha 2) and norm (DyT alpha 0.5) and
    random gains, attention's input (pre, peri) or the norm after its residual add (post) is the attn_norm
    module, whose output goes on; the MLP side is the other norm."""
    torch.manual_seed(0)
    model = nb.models.create("transformer_lm", norm={"name": "dyt", "alpha_init": 0.5},
                             attn_norm={"name": "dyt", "alpha_init": 2.0}, norm_placement=placement, **LM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("alpha"):  # the alphas tell the two norms apart
                p.add_(torch.randn_like(p) * 0.1)
    blk, seen = model.blocks[0], {}
    for name in ("n1", "n2", "attn", "mlp"):
        getattr(blk, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}))
    x = torch.randn(2, 8, 32)
    blk(x, None, None)
    tanh = lambda norm, v: norm.weight * torch.tanh(norm.alpha * v) + norm.bias  # noqa: E731
    assert blk.n1.alpha.item() == pytest.approx(2.0) and blk.n2.alpha.item() == pytest.approx(0.5)
    if placement == "post":
        torch.testing.assert_close(seen["n1"][0], x + seen["attn"][1])  # n1 = N(x + attn(x))
        torch.testing.assert_close(seen["mlp"][0], seen["n1"][1])
    else:
        torch.testing.assert_close(seen["attn"][0], tanh(blk.n1, x))  # attention reads n1(x) = attn_norm(x)
        torch.testing.assert_close(seen["n2"][1], tanh(blk.n2, seen["n2"][0]))
        torch.testing.assert_close(seen["mlp"][0], seen["n2"][1])
    if placement == "peri":
        assert blk.n1_out.alpha.item() == pytest.approx(2.0) and blk.n2_out.alpha.item() == pytest.approx(0.5)


def test_lm_attn_norm_through_a_run_config():
    """The CLI path: dotted overrides as a user types them validate (model built on meta), round-trip through the
    saved config, and a bad value fails at validation naming the key."""
    from normablate.config import load_config, to_yaml

    lm = ["model.backbone=transformer_lm", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
    cfg = load_config(None, [*lm, "model.norm={name: dyt, alpha_init: 0.5}", "model.attn_norm={name: dyt, alpha_init: 2}"])
    assert cfg.model.options["attn_norm"] == {"name": "dyt", "alpha_init": 2}
    assert "attn_norm:" in to_yaml(cfg)
    with pytest.raises(nb.ConfigError, match=r"^model\.attn_norm=\{'name': 'dyt', 'alpha_init': 0\}: .*cannot be built"):
        load_config(None, [*lm, "model.norm=dyt", "model.attn_norm={name: dyt, alpha_init: 0}"])


def test_vit_bad_ffn_norm_is_a_config_error_naming_the_key():
    with pytest.raises(nb.ConfigError, match=r"^model\.ffn_norm='bogus': unknown norm 'bogus'; valid: "):
        nb.models.create("vit", norm="ln", ffn_norm="bogus", **VIT)


def test_lm_peri_and_post_blocks_compute_their_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    for placement in ("peri", "post"):
        model = nb.models.create("transformer_lm", norm="ln", norm_placement=placement, **LM)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial gains and biases
        blk = model.blocks[0]
        attn = lambda t: blk.attn(t, None)  # noqa: E731
        if placement == "peri":
            h = x + blk.n1_out(attn(blk.n1(x)))
            expected = h + blk.n2_out(blk.mlp(blk.n2(h)))
            assert model.norm_f is not None
        else:
            h = blk.n1(x + attn(x))
            expected = blk.n2(h + blk.mlp(h))
            assert model.norm_f is None
        torch.testing.assert_close(blk(x, None, None), expected)


def test_vit_placements_compute_their_formula_and_pre_is_timms_block():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(2, 65, 32)
    for placement in ("peri", "post"):
        model = nb.models.create("vit", norm="ln", norm_placement=placement, **VIT)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        blk = model.blocks[0]
        if placement == "peri":
            h = x + blk.norm1_out(blk.attn(blk.norm1(x)))
            expected = h + blk.norm2_out(blk.mlp(blk.norm2(h)))
            assert nb.norms.is_norm(model.norm)
        else:
            h = blk.norm1(x + blk.attn(x))
            expected = blk.norm2(h + blk.mlp(h))
            assert not nb.norms.is_norm(model.norm)  # post ends on a norm: no final norm
        torch.testing.assert_close(blk(x), expected)
    # the default (pre, no QK norm) is timm's model: same parameter names, same outputs
    torch.manual_seed(0)
    ours = nb.models.create("vit", norm="ln", **VIT)
    timm_model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                                   mlp_ratio=2.0, class_token=True, global_pool="token",
                                   norm_layer=nb.norms.resolve("ln", "tokens"))
    assert list(ours.state_dict()) == list(timm_model.state_dict())
    timm_model.load_state_dict(ours.state_dict())
    xi = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(xi), timm_model(xi), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["transformer_lm", "vit"])
def test_bad_placement_and_qk_norm_are_config_errors(backbone):
    kw = LM if backbone == "transformer_lm" else VIT
    with pytest.raises(nb.ConfigError, match=r"norm_placement='sandwich' is not allowed; valid: pre, post, peri"):
        nb.models.create(backbone, norm_placement="sandwich", **kw)
    with pytest.raises(nb.ConfigError, match=r"unknown norm 'layernorm'"):
        nb.models.create(backbone, qk_norm="layernorm", **kw)
    with pytest.raises(nb.ConfigError, match=r"norm 'rms' got unknown option\(s\) momentum"):
        nb.models.create(backbone, qk_norm={"name": "rms", "momentum": 0.1}, **kw)


@pytest.mark.slow
def test_dyt_claim_is_one_config_change(tmp_path, shared_data):
    """The DyT headline (norm-free Transformers match LN) from the shipped LM and ViT configs: model.norm=dyt
    (for the ViT also without the config's BN-in-FFN) builds and trains 2 steps with DyT in every norm site."""
    from normablate.config import load_config
    from normablate.train import train

    root = Path(__file__).resolve().parents[2]
    for name, source, extra in (("lm_shakespeare", str(shared_data / "tinyshakespeare" / "input.txt"), []),
                                ("vit_cifar10", str(shared_data / "cifar10"), ["model.ffn_norm=null"])):
        over = ["model.norm=dyt", *extra, f"data.source={source}", f"trainer.log_dir={tmp_path}",
                "trainer.max_steps=2", "trainer.val_every=2", "trainer.val_batches=1", "data.train_limit=256",
                "data.val_limit=64", "data.val_batch_size=32", "data.batch_size=8", "trainer.progress=false",
                "trainer.accelerator=cpu"]
        cfg = load_config(root / "configs" / "runs" / f"{name}.yaml", over)
        assert cfg.model.norm == "dyt"
        result = train(cfg)
        assert result.status == "completed" and result.steps == 2, name
        assert math.isfinite(result.final["val/loss"])


@pytest.mark.parametrize("norm,cls", [("dyt", "dyt.DynamicTanh"), ("powernorm", "powernorm.PowerNorm"),
                                      ("batch_renorm", "renorm.BatchRenorm")])
def test_new_norms_fill_every_norm_site_of_every_backbone(norm, cls):
    from support.backbones import EXPECTED_SITES, TINY

    module, name = cls.split(".")
    kind = getattr(getattr(nb.norms, module), name)
    for backbone, kw in TINY.items():
        model = nb.models.create(backbone, norm=norm, **kw)
        found = [m for m in model.modules() if nb.norms.is_norm(m)]
        assert len(found) == EXPECTED_SITES[backbone] and all(type(m) is kind for m in found), backbone
    # a conv bias is dropped only before batch_renorm (it subtracts the batch mean; PowerNorm and DyT do not)
    assert (nb.models.create("resnet20", norm=norm).stem.conv.bias is None) == (norm == "batch_renorm")
