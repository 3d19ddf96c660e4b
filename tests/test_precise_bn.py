"""PreciseBN: recalibrated running statistics are the exact population statistics of the given batches
(masked BN: real tokens only; under DDP: pooled over ranks), the EMA buffers are left as they were, and switching
PreciseBN on in a run adds the *_precise metrics without changing anything else."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normablate as nb
from normablate.config import load_config
from normablate.precise_bn import bn_layers, population_stats, recent_steps, swapped
from normablate.train import train

from support.dist import run_ranks

TOL = dict(atol=1e-5, rtol=1e-5)


def _image_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nb.norms.create("bn", 4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3), nb.norms.create("noisy_bn", 6), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(3))


def _image_batches(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5 + i, 3, 7, 7, generator=g) * (1 + i) + i for i in range(n)]


def _inputs_of(model: nn.Module, batches, call) -> dict[nn.Module, list[torch.Tensor]]:
    """What each BN layer receives in training mode (the reference: plain hooks, nothing clever)."""
    seen: dict[nn.Module, list] = {m: [] for m in bn_layers(model)}
    hooks = [m.register_forward_pre_hook(lambda m, a, kw: seen[m].append((a[0].detach(), kw.get("mask"))),
                                         with_kwargs=True) for m in seen]
    model.train()
    for m in seen:
        if hasattr(m, "noise_enabled"):
            m.noise_enabled = False
    with torch.no_grad():
        for b in batches:
            call(b)
    for h in hooks:
        h.remove()
    return seen


def test_image_population_statistics_and_buffers_untouched():
    model = _image_model()
    batches = _image_batches()
    model(batches[0])  # materialize the lazy layer; moves the EMA away from its init
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = population_stats(model, batches, model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running buffers must be left as they were"
    assert not any(m.training for m in bn_layers(model)), "layer modes restored"
    clone = copy.deepcopy(model)  # same weights, fresh hooks
    ref = _inputs_of(clone, batches, clone)
    assert len(ref) == len(stats) == 2
    for m, r in zip(bn_layers(model), ref.values()):
        x = torch.cat([t.transpose(0, 1).flatten(1) for t, _ in r], dim=1)  # (C, all values)
        mean, var = stats[m]
        torch.testing.assert_close(mean, x.mean(1), **TOL)
        torch.testing.assert_close(var, x.var(1, unbiased=True), **TOL)  # population, unbiased
    with swapped(stats):
        for m in bn_layers(model):
            torch.testing.assert_close(m.running_mean, stats[m][0])
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_masked_bn_population_statistics_use_real_tokens_only():
    torch.manual_seed(0)
    model = nb.models.create("transformer_lm", norm="masked_bn", n_layer=1, n_embd=16, n_head=2, vocab_size=256,
                             block_size=16)
    g = torch.Generator().manual_seed(1)
    batches = []
    for b, t in ((3, 9), (4, 12)):
        idx = torch.randint(0, 256, (b, t), generator=g)
        lens = torch.randint(1, t + 1, (b,), generator=g)
        batches.append((idx, torch.arange(t)[None, :] < lens[:, None]))
    stats = population_stats(model, batches, lambda bt: model(bt[0], mask=bt[1]))
    clone = copy.deepcopy(model)
    ref = _inputs_of(clone, batches, lambda bt: clone(bt[0], mask=bt[1]))
    assert len(stats) == len(ref) > 0
    for m, r in zip(bn_layers(model), ref.values()):
        x = torch.cat([t[mask] for t, mask in r])  # (real tokens, C): padded positions left out
        mean, var = stats[m]
        torch.testing.assert_close(mean, x.mean(0), **TOL)
        torch.testing.assert_close(var, x.var(0, unbiased=True), **TOL)


def test_recent_steps():
    assert list(recent_steps(100, 3)) == [97, 98, 99]
    assert list(recent_steps(2, 5)) == [0, 1, 2, 3, 4]


def _rank_population(rank: int, world: int) -> dict:
    model = _image_model()  # seeded: identical weights on both ranks
    batches = _image_batches()
    model(batches[0])
    mine = batches[rank::world]  # rank 0: batches 0 and 2; rank 1: batch 1
    stats = population_stats(model, mine, model)
    return {i: (v[0].clone(), v[1].clone()) for i, v in enumerate(stats.values())}


@pytest.mark.slow
def test_population_statistics_pooled_over_ranks(tmp_path):
    got = run_ranks(_rank_population, 2, (), tmp_path)
    model = _image_model()
    batches = _image_batches()
    model(batches[0])
    want = population_stats(model, batches, model)  # one process, every batch
    for r in got:
        for i, (mean, var) in enumerate(want.values()):
            torch.testing.assert_close(r[i][0], mean, **TOL)
            torch.testing.assert_close(r[i][1], var, **TOL)


def test_precise_bn_in_a_run_changes_nothing_else(tmp_path):
    base = ["model.backbone=resnet20", "model.width=4", "model.norm=bn", "data.source=synthetic",
            "data.batch_size=16", "data.train_limit=512", "data.val_limit=64", "data.val_batch_size=32",
            "optim.name=adamw", "optim.lr=3e-3", "trainer.max_steps=6", "trainer.val_every=3",
            "trainer.progress=false", f"trainer.log_dir={tmp_path}", "experiment=t"]
    plain = train(load_config(None, [*base, "run=plain"]))
    precise = train(load_config(None, [*base, "run=precise", "trainer.precise_bn=3"]))
    for k, v in plain.history.items():
        assert precise.history[k] == v, f"{k} changed when PreciseBN was switched on"
    for k in ("val/loss_precise", "val/acc_precise", "val/train_eval_gap_precise"):
        assert [s for s, _ in precise.history[k]] == [3, 6]
    gap = precise.final["val/train_eval_gap_precise"]
    assert gap == pytest.approx(precise.final["val/loss_precise"] - precise.final["val/loss_batchstats"])
