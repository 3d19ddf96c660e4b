"""optim.schedule=step (multi-step decay at fractions of the run): the LR sequence equals torch's MultiStepLR, warmup
composes with it, and a bad milestone list is refused before anything is built."""
from __future__ import annotations

import pytest
import torch

from normablate.config import OptimConfig, load_config
from normablate.errors import ConfigError
from normablate.tasks.optim import build_scheduler


def _lrs(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def test_step_schedule_equals_multisteplr():
    # kuangliu/pytorch-cifar's recipe: x0.1 at epochs 150 and 250 of 350 -> fractions 3/7 and 5/7 of the run
    max_steps = 350
    cfg = OptimConfig(lr=0.1, schedule="step", milestones=[150 / 350, 250 / 350], gamma=0.1)
    ours = _opt()
    got = _lrs(build_scheduler(cfg, ours, max_steps), ours, max_steps)
    ref = _opt()
    want = _lrs(torch.optim.lr_scheduler.MultiStepLR(ref, milestones=[150, 250], gamma=0.1), ref, max_steps)
    assert got == pytest.approx(want, rel=1e-12)
    assert got[149] == pytest.approx(0.1) and got[150] == pytest.approx(0.01) and got[250] == pytest.approx(0.001)


def test_step_schedule_after_warmup():
    cfg = OptimConfig(lr=1.0, schedule="step", milestones=[0.5], gamma=0.2, warmup_steps=4)
    opt = _opt(1.0)
    got = _lrs(build_scheduler(cfg, opt, 20), opt, 20)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4:10] == pytest.approx([1.0] * 6)
    assert got[10:] == pytest.approx([0.2] * 10)  # milestone 0.5 of 20 steps = step 10, counted from step 0


@pytest.mark.parametrize("overrides, match", [
    (["optim.schedule=step"], r"optim.schedule='step' needs optim.milestones"),
    (["optim.schedule=step", "optim.milestones=[0.75, 0.5]"], r"optim.milestones=\[0.75, 0.5\] must be an increasing"),
    (["optim.schedule=step", "optim.milestones=[150, 250]"], r"each in \(0, 1\)"),
    (["optim.schedule=cosine", "optim.milestones=[0.5]"], r"applies to optim.schedule='step' only"),
    (["optim.schedule=step", "optim.milestones=[0.5]", "optim.gamma=0"], r"optim.gamma=0"),
    (["optim.schedule=steps"], r"optim.schedule"),
])
def test_bad_step_schedule_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_step_schedule_config_loads():
    cfg = load_config(None, ["optim.schedule=step", "optim.milestones=[0.5, 0.75]", "optim.gamma=0.1"])
    assert cfg.optim.milestones == [0.5, 0.75] and cfg.optim.gamma == 0.1
