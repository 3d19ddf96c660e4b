"""Ghost BatchNorm (``ghost_batch_size: k`` of bn, noisy_bn, masked_bn; normablate/norms/batch.py).

References: ``nn.BatchNorm1d/2d`` applied to each group of k consecutive samples in sequence (outputs, input and
parameter gradients, running statistics, num_batches_tracked), ``masked_bn`` applied to each group, and plain BN
when k is the whole batch (to 1e-6 in float32)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normablate as nb
from normablate.config import load_config
from normablate.errors import ConfigError

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-6, rtol=1e-6)


def _affine(m: nn.Module, c: int) -> None:
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, c)), m.bias.copy_(torch.linspace(-0.3, 0.3, c))


def _run(m: nn.Module, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None, **kw):
    """Output, input gradient and parameter gradients of ``sum(m(x) * w)``."""
    xx = x.clone().requires_grad_(True)
    m.zero_grad()
    y = m(xx, mask=mask, **kw) if mask is not None else m(xx)
    (y * w).sum().backward()
    return y.detach(), xx.grad, m.weight.grad.clone(), m.bias.grad.clone()


def _per_group_reference(ref: nn.Module, x: torch.Tensor, w: torch.Tensor, k: int, to_bn=lambda t: t,
                         from_bn=lambda t: t):
    """``ref`` (an nn.BatchNorm) applied to each group of k samples in sequence: the ghost BN definition."""
    xx = x.clone().requires_grad_(True)
    ref.zero_grad()
    ys = [from_bn(ref(to_bn(xx[i:i + k]))) for i in range(0, x.shape[0], k)]
    y = torch.cat(ys)
    (y * w).sum().backward()
    return y.detach(), xx.grad, ref.weight.grad.clone(), ref.bias.grad.clone()


def _assert_same(a, b, tol) -> None:
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


def _assert_running(m: nn.Module, ref: nn.Module, tol) -> None:
    torch.testing.assert_close(m.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(m.running_var, ref.running_var, **tol)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_image_equals_batchnorm2d_on_each_group(k, momentum):
    torch.manual_seed(0)
    m = nb.norms.create("bn", 3, layout="image", ghost_batch_size=k, momentum=momentum).double()
    ref = nn.BatchNorm2d(3, momentum=momentum).double()
    _affine(m, 3), _affine(ref, 3)
    for step in range(3):  # running statistics carry over steps; num_batches_tracked counts groups
        x = torch.randn(8, 3, 4, 5, dtype=torch.float64) * (1 + step) + step
        w = torch.randn_like(x)
        _assert_same(_run(m, x, w), _per_group_reference(ref, x, w, k), F64)
        _assert_running(m, ref, F64)
    assert int(m.num_batches_tracked) == 3 * 8 // k
    m.eval(), ref.eval()  # eval: running statistics, as BN
    x = torch.randn(5, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), **F64)


@pytest.mark.parametrize("k", [2, 3])
def test_tokens_equal_batchnorm1d_on_each_group(k):
    torch.manual_seed(1)
    m = nb.norms.create("bn", 5, layout="tokens", ghost_batch_size=k).double()
    ref = nn.BatchNorm1d(5).double()
    _affine(m, 5), _affine(ref, 5)
    to_bn = lambda t: t.reshape(-1, 5)  # noqa: E731  a group's (k, T, C) tokens: (k*T, C) rows
    for _ in range(2):
        x = torch.randn(6, 4, 5, dtype=torch.float64) + 0.5
        w = torch.randn_like(x)
        got = _run(m, x, w)
        want = _per_group_reference(ref, x, w, k, to_bn, lambda t: t.view(-1, 4, 5))
        _assert_same(got, want, F64)
        _assert_running(m, ref, F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["bn", "noisy_bn", "masked_bn"])
@pytest.mark.parametrize("layout", ["image", "tokens"])
def test_whole_batch_group_is_exactly_bn(name, layout, dtype):
    """k = the batch: outputs, input gradients and running statistics to 1e-6 in float32 (1e-10 in float64).
    The parameter gradients are sums over the 200 values of a channel: in float32 both PyTorch's kernel and the
    ghost path are 1-3e-6 from the float64 value (measured), so they compare at 1e-5 there (1e-10 in float64)."""
    torch.manual_seed(2)
    shape = (8, 6, 5, 5) if layout == "image" else (8, 7, 6)
    ghost = nb.norms.create(name, 6, layout=layout, ghost_batch_size=8).to(dtype)
    plain = nb.norms.create(name, 6, layout=layout).to(dtype)
    _affine(ghost, 6), _affine(plain, 6)
    if name == "noisy_bn":
        ghost.noise_enabled = plain.noise_enabled = False
    tol = F32 if dtype == torch.float32 else F64
    for _ in range(2):
        x = torch.randn(shape, dtype=dtype) * 2 + 1
        w = torch.randn(shape, dtype=dtype)
        (y, dx, dw, db), (y0, dx0, dw0, db0) = _run(ghost, x, w), _run(plain, x, w)
        _assert_same((y, dx), (y0, dx0), tol)
        _assert_same((dw, db), (dw0, db0), dict(atol=1e-5, rtol=0) if dtype == torch.float32 else F64)
        _assert_running(ghost, plain, tol)


def test_masked_equals_masked_bn_on_each_group():
    """Groups of sequences; each group's statistics over its real tokens only; a group without a real token is
    skipped by the running statistics (as an all-pad batch); inf/NaN at pads never leaks."""
    torch.manual_seed(3)
    n, t, c, k = 8, 5, 4, 2
    lengths = torch.tensor([5, 3, 0, 0, 2, 4, 1, 5])  # group 1 (samples 2, 3) is all padding
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (N, T) True = real
    m = nb.norms.create("masked_bn", c, layout="tokens", ghost_batch_size=k).double()
    ref = nb.norms.create("masked_bn", c, layout="tokens").double()
    _affine(m, c), _affine(ref, c)
    for _ in range(2):
        x = torch.randn(n, t, c, dtype=torch.float64)
        x[~mask] = float("inf")  # a pad's value must not matter
        x[2, 0, 0] = float("nan")
        w = torch.randn_like(x)
        got = _run(m, x, w, mask=mask)
        xx = x.clone().requires_grad_(True)
        ref.zero_grad()
        y = torch.cat([ref(xx[i:i + k], mask=mask[i:i + k]) for i in range(0, n, k)])
        (y * w).sum().backward()
        want = (y.detach(), xx.grad, ref.weight.grad, ref.bias.grad)
        _assert_same(got, want, F64)
        _assert_running(m, ref, F64)
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()
    assert int(m.num_batches_tracked) == 2 * 3  # 3 groups with real tokens per step
    # a group with exactly one real token has no batch statistics: a clear error, as masked_bn on that group
    one = mask.clone()
    one[0], one[1] = False, False
    one[0, 0] = True
    with pytest.raises(RuntimeError, match="ghost_batch_size=2: a ghost group holds exactly one real token"):
        m(torch.randn(n, t, c, dtype=torch.float64), mask=one)


def test_noisy_bn_ghost_is_ghost_bn_then_the_same_noise():
    torch.manual_seed(4)
    noisy = nb.norms.create("noisy_bn", 3, ghost_batch_size=2).double()
    plain = nb.norms.create("bn", 3, ghost_batch_size=2).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    torch.manual_seed(7)
    y = noisy(x)
    torch.manual_seed(7)
    scale, shift = noisy._draw_noise(x, 1)  # the same draw the forward made
    torch.testing.assert_close(y, plain(x) * scale + shift, **F64)
    _assert_running(noisy, plain, F64)
    noisy.eval(), plain.eval()
    torch.testing.assert_close(noisy(x), plain(x) * (1 + noisy.noise_scale) / 2, **F64)


def test_channels_last_input_stays_channels_last():
    torch.manual_seed(5)
    a = nb.norms.create("bn", 4, ghost_batch_size=2).double()
    b = copy.deepcopy(a)
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    w = torch.randn_like(x)
    xl = x.contiguous(memory_format=torch.channels_last)
    got = _run(a, xl, w)
    assert a(xl).is_contiguous(memory_format=torch.channels_last)
    b.num_batches_tracked.zero_(), b.running_mean.zero_(), b.running_var.fill_(1)
    _assert_same(got, _run(b, x, w), F64)


def test_partial_group_is_refused_in_training_unless_allowed():
    torch.manual_seed(6)
    m = nb.norms.create("bn", 3, ghost_batch_size=4).double()
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bn: ghost_batch_size=4 needs a batch divisible by 4 in training; got 10 "
                                         r"samples \(2 group\(s\) of 4 and 2 left over\)"):
        m(x)
    m.allow_partial_ghost_group = True  # what the diagnostic passes set: the last 2 samples form one group
    ref = nn.BatchNorm2d(3).double()
    y = m(x)
    want = torch.cat([ref(x[0:4]), ref(x[4:8]), ref(x[8:10])])
    torch.testing.assert_close(y, want, **F64)
    _assert_running(m, ref, F64)
    free = nb.norms.create("bn", 3, ghost_batch_size=4, track_running_stats=False).double().eval()
    torch.testing.assert_close(free(x), want, **F64)  # no running stats: eval takes any batch, last group smaller
    with pytest.raises(ValueError, match="ghost_batch_size=1 leaves one value per channel"):
        nb.norms.create("bn", 3, layout="tokens", ghost_batch_size=1)(torch.randn(4, 3))


@pytest.mark.parametrize("value,message", [
    (0, "ghost_batch_size must be null \\(off\\) or an integer >= 1"),
    (2.5, "ghost_batch_size must be null \\(off\\) or an integer >= 1"),
    ("four", "ghost_batch_size must be null \\(off\\) or an integer >= 1"),
])
def test_bad_values_are_config_errors(value, message):
    for name in ("bn", "noisy_bn", "masked_bn"):
        with pytest.raises(ConfigError, match=f"{name}: {message}"):
            nb.norms.create(name, 4, ghost_batch_size=value)
    assert "ghost_batch_size" not in nb.norms.options("batch_renorm")  # only the three named families


def test_sync_is_refused():
    for name in ("bn", "noisy_bn", "masked_bn"):
        with pytest.raises(ConfigError, match=f"{name}: ghost_batch_size=2 cannot be combined with sync: true"):
            nb.norms.create(name, 4, ghost_batch_size=2, sync=True)
    from normablate.norms import sync

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nb.norms.create("bn", 4, ghost_batch_size=2))
    with pytest.raises(ValueError, match="'1'.*ghost_batch_size=2.*cannot be synchronized"):
        sync.enable(model)
    assert model[1].sync is False


TINY = ["model.backbone=vgg11", "model.width=0.125", "data.source=synthetic", "data.batch_size=16",
        "data.train_limit=256", "data.val_limit=100", "data.val_batch_size=30", "trainer.max_steps=4",
        "trainer.val_every=2", "trainer.progress=false"]


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match=r"ghost_batch_size=5 \(a norm option in model\.\*\) must divide the "
                                          r"training batch per rank, data\.batch_size=16 / 1 rank\(s\) = 16"):
        load_config(None, [*TINY, "model.norm={name: bn, ghost_batch_size: 5}"])
    with pytest.raises(ConfigError, match=r"data\.batch_size=16 / 2 rank\(s\) = 8"):
        load_config(None, [*TINY, "model.norm={name: bn, ghost_batch_size: 16}", "trainer.devices=2"])
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true cannot be combined with ghost_batch_size=4"):
        load_config(None, [*TINY, "model.norm={name: bn, ghost_batch_size: 4}", "trainer.sync_batchnorm=true"])
    with pytest.raises(ConfigError, match="ghost_batch_size=2 cannot be combined with sync: true"):
        load_config(None, [*TINY, "model.norm={name: bn, ghost_batch_size: 2, sync: true}"])
    with pytest.raises(ConfigError, match="ghost_batch_size must be null"):
        load_config(None, [*TINY, "model.norm={name: noisy_bn, ghost_batch_size: 0}"])
    cfg = load_config(None, [*TINY, "model.norm={name: bn, ghost_batch_size: 4}", "trainer.devices=2"])
    assert cfg.model.norm == {"name": "bn", "ghost_batch_size": 4}


def test_sweep_grid_with_ghost_groups():
    from normablate.sweep.spec import load_spec

    base = {"model": {"backbone": "vgg11", "norm": "bn", "width": 0.125},
            "data": {"source": "synthetic", "batch_size": 16, "train_limit": 256, "val_limit": 64},
            "trainer": {"max_steps": 4, "val_every": 2}}
    grid = {"seed": [0], "optim.lr": [0.1],
            "model.norm": [{"name": "bn", "ghost_batch_size": k} for k in (2, 4, 8, 16)]}
    spec = load_spec({"kind": "lr_sensitivity", "study_name": "ghost", "base": base, "grid": grid})
    assert len(spec.points()) == 4
    grid["model.norm"].append({"name": "bn", "ghost_batch_size": 32})
    with pytest.raises(ConfigError, match=r"grid point .*ghost_batch_size=32 \(a norm option in model\.\*\) must "
                                          r"divide the training batch per rank"):
        load_spec({"kind": "lr_sensitivity", "study_name": "ghost", "base": base, "grid": grid})


def test_train_with_ghost_groups_and_odd_validation_batches(tmp_path):
    """`normablate train` end to end: ghost groups of 4 in a batch of 16; validation batches of 30 (and a last one
    of 10) in the batch-statistics pass get a smaller last group; PreciseBN runs on the ghost model."""
    from normablate.train import train

    res = train(load_config(None, [*TINY, "model.norm={name: bn, ghost_batch_size: 4}", "trainer.precise_bn=2",
                                   "trainer.max_steps=2", f"trainer.log_dir={tmp_path}"]))
    assert res.status == "completed" and res.steps == 2
    assert res.config["model"]["norm"] == {"name": "bn", "ghost_batch_size": 4}
    keys = set(res.final)
    assert {"val/loss", "val/loss_batchstats", "val/loss_precise"} <= keys
    assert all(torch.isfinite(torch.tensor(float(res.final[k]))) for k in ("val/loss", "val/loss_batchstats"))


def test_precise_bn_population_statistics_with_ghost_groups():
    """PreciseBN recomputes the population statistics of each layer's training-mode input (ghost groups shaping the
    later layers' inputs), restores the layers' flags and buffers."""
    from normablate.precise_bn import population_stats

    torch.manual_seed(8)
    net = nn.Sequential(nb.norms.create("bn", 3, ghost_batch_size=2), nn.Conv2d(3, 3, 1),
                        nb.norms.create("bn", 3, ghost_batch_size=2)).double().eval()
    batches = [torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    batches.append(torch.randn(3, 3, 3, 3, dtype=torch.float64))  # an odd batch: the last group is smaller
    before = copy.deepcopy(net.state_dict())
    stats = population_stats(net, batches, net)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert not net[0].training and net[0].allow_partial_ghost_group is False
    probe = copy.deepcopy(net).train()  # the second BN's input: the conv of the first BN's ghost-group output
    for m in probe:
        if hasattr(m, "allow_partial_ghost_group"):
            m.allow_partial_ghost_group = True
    inputs = torch.cat([probe[1](probe[0](b)) for b in batches])  # (sum N, C, H, W)
    vals = inputs.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(stats[net[2]][0], vals.mean(1), **F64)
    torch.testing.assert_close(stats[net[2]][1], vals.var(1, unbiased=True), **F64)


def test_fold_keeps_ghost_bn_eval_outputs():
    """Eval-mode ghost BN is BN with running statistics: it folds into the conv before it."""
    from normablate.fold import fold_batchnorm

    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nb.norms.create("bn", 4, ghost_batch_size=2), nn.ReLU())
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6))  # training: ghost running statistics
    net.eval()
    folded, count = fold_batchnorm(net)
    assert count == 1
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["image", "tokens"])
def test_without_affine_parameters(layout):
    """affine: false (no gamma/beta): both the fused image path and the composed path."""
    torch.manual_seed(10)
    m = nb.norms.create("bn", 3, layout=layout, affine=False, ghost_batch_size=2).double()
    ref = (nn.BatchNorm2d if layout == "image" else nn.BatchNorm1d)(3, affine=False).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) if layout == "image" else torch.randn(6, 5, 3, dtype=torch.float64)
    w = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (m(xa) * w).sum().backward()
    to_bn = (lambda t: t) if layout == "image" else (lambda t: t.reshape(-1, 3))  # noqa: E731
    yb = torch.cat([ref(to_bn(xb[i:i + 2])).view(xb[i:i + 2].shape) for i in range(0, 6, 2)])
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **F64)
    _assert_running(m, ref, F64)


def test_inplace_activation_after_ghost_bn():
    """The fused image path's output takes an inplace ReLU (as in VGG/ResNet), with BN-per-group gradients."""
    torch.manual_seed(11)
    m = nb.norms.create("bn", 3, ghost_batch_size=2).double()
    ref = nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.relu_(m(xa)).sum().backward()
    torch.cat([torch.relu(ref(xb[i:i + 2])) for i in (0, 2)]).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **F64)


def test_lm_with_masked_ghost_groups_of_sequences():
    """Through the LM (every norm site, qk_norm included, gets the padding mask): groups of 2 sequences; a
    sequence's outputs depend only on its own group (changing another group's tokens leaves them unchanged)."""
    torch.manual_seed(12)
    norm = {"name": "masked_bn", "ghost_batch_size": 2}
    lm = nb.models.create("transformer_lm", norm=norm, qk_norm=norm, n_layer=1, n_embd=16, n_head=2,
                          block_size=8).double()
    idx = torch.randint(0, 256, (4, 8))
    mask = torch.arange(8)[None, :] < torch.tensor([8, 5, 6, 3])[:, None]
    out = lm(idx, mask=mask)
    logits = out[0] if isinstance(out, tuple) else out
    logits[mask].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
    other = idx.clone()
    other[2:] = torch.randint(0, 256, (2, 8))  # the second group only
    out2 = lm(other, mask=mask)
    logits2 = out2[0] if isinstance(out2, tuple) else out2
    torch.testing.assert_close(logits2[:2][mask[:2]], logits[:2][mask[:2]].detach(), **F64)
