"""Rules that keep an ablation fair: weight decay only on dim >= 2 tensors for every norm alike, and the
batch-statistics validation (train/eval gap) leaves running statistics, num_batches_tracked and noise untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normablate as nb
from normablate.config import OptimConfig
from normablate.tasks import using_batch_statistics
from normablate.tasks.optim import build_optimizer, param_groups

NORMS = ["bn", "noisy_bn", "ln", "rms", "gn", "none"]


@pytest.mark.parametrize("norm", NORMS)
def test_weight_decay_only_on_matrices_for_every_norm(norm):
    model = nb.models.create("vgg11", norm=norm, width=0.125)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    norm_params = {id(p) for m in model.modules() if getattr(m, "is_normalization", False) or
                   isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm))
                   for p in m.parameters(recurse=False)}
    assert norm_params <= {id(p) for p in no_decay["params"]}  # gains and shifts never decayed
    if norm != "none":
        assert norm_params, "this norm has affine parameters"
    # and the optimizer really applies it so: a step with zero gradients moves only the decayed tensors
    for name in ("sgd", "adamw"):
        m = nb.models.create("vgg11", norm=norm, width=0.125)
        opt = build_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.1), m)
        before = [p.detach().clone() for p in m.parameters()]
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p, b in zip(m.parameters(), before):
            moved = not torch.equal(p, b)
            assert moved == (p.dim() >= 2 and bool(b.abs().sum() > 0)), (name, tuple(p.shape))


def test_tied_weights_are_in_one_group_once():
    model = nb.models.create("transformer_lm", norm="ln", n_layer=1, n_embd=32, n_head=2)
    decay, no_decay = param_groups(model, 0.1)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("norm", ["bn", "noisy_bn"])
def test_batch_statistics_validation_restores_buffers_mode_and_noise(norm):
    torch.manual_seed(0)
    model = nb.models.create("vgg11", norm=norm, width=0.125)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert any("num_batches_tracked" in k for k in buffers)
    x = torch.randn(16, 3, 32, 32)
    with using_batch_statistics(model):
        assert all(m.training for m in layers)
        if norm == "noisy_bn":
            assert all(not m.noise_enabled for m in layers)
        y1, y2 = model(x), model(x)  # batch statistics, no noise: deterministic
    assert torch.equal(y1, y2)
    after = model.state_dict()
    for k, v in buffers.items():
        assert torch.equal(after[k], v), f"{k} changed by the batch-statistics validation"
    assert not any(m.training for m in layers) and not model.training  # eval mode back
    if norm == "noisy_bn":
        assert all(m.noise_enabled for m in layers)  # noise back on for training
        model.train()
        assert not torch.equal(model(x), model(x))  # and it is drawn again in training
