"""trainer.channels_last and trainer.compile do not change the math: same outputs and gradients as the default
(within float tolerance); the training step's grad-norm logging is computed only on logged steps."""
from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch

import normablate as nb
from normablate.train import speed_options


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm", ["bn", "ln", "rms", "gn", "none"])
def test_channels_last_same_outputs_and_gradients(norm):
    base = nb.models.create("resnet20", norm=norm, num_classes=10, width=4)
    fast = speed_options(copy.deepcopy(base), SimpleNamespace(channels_last=True, compile=False))
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    x = torch.randn(4, 3, 16, 16)
    ya, ga = _fwd_bwd(base, x)
    yb, gb = _fwd_bwd(fast, x)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("g++") is None, reason="torch.compile on CPU "
                    "needs a C++ compiler")
@pytest.mark.parametrize("backbone,norm", [("transformer_lm", "masked_bn")])  # our autograd.Function too
def test_compile_same_outputs_and_gradients(backbone, norm):
    kw = {"num_classes": 10, "width": 4} if backbone == "resnet20" else \
        {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 32, "block_size": 8}
    base = nb.models.create(backbone, norm=norm, **kw)
    fast = speed_options(copy.deepcopy(base), SimpleNamespace(channels_last=False, compile=True))
    assert fast.state_dict().keys() == base.state_dict().keys()  # checkpoints unchanged
    if backbone == "resnet20":
        args = (torch.randn(4, 3, 16, 16),)
    else:
        mask = torch.ones(3, 8, dtype=torch.bool)
        mask[1, 5:] = False
        args = (torch.randint(0, 32, (3, 8)), mask)

    def run(model):
        model.zero_grad(set_to_none=True)
        y = model(args[0]) if len(args) == 1 else model(args[0], mask=args[1])
        y.float().square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ya, ga = run(base)
    yb, gb = run(fast)
    torch.testing.assert_close(yb, ya, atol=1e-4, rtol=1e-4)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(dict(fast.named_buffers()), dict(base.named_buffers()), atol=1e-5, rtol=1e-5)


def test_speed_options_are_config_keys():
    from normablate.config import load_config

    cfg = load_config(None, ["trainer.channels_last=true", "trainer.compile=false"])
    assert cfg.trainer.channels_last is True and cfg.trainer.compile is False
    with pytest.raises(nb.ConfigError):
        load_config(None, ["trainer.channels_lst=true"])
