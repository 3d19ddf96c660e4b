"""Synchronized batch statistics (norms/sync.py) with 2 gloo processes against one process on the whole batch.

Each rank holds a different slice (masked: different lengths, padding and T per rank); the synchronized norm
must give, on every rank, the outputs and input gradients of one process on the concatenated batch, parameter
gradients that sum over ranks to the single-process ones (what DDP then averages), and the same running
statistics. An unsynchronized BN must instead equal BN on each rank's own slice.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normablate as nb
from normablate.norms import sync

from support.dist import run_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
C = 5
STEPS = 3


def _image_batches(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    full = torch.randn(7, C, 4, 3, generator=g) * (step + 2) + step  # 7 images: ranks get 4 and 3
    return [full[:4], full[4:]]


def _token_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0: 3 sequences of T=6; rank 1: 2 sequences of T=9 (different padding), lengths vary with the step."""
    g = torch.Generator().manual_seed(200 + step)
    out = []
    for n, t, lens in ((3, 6, [6, 2, 0]), (2, 9, [9, 1 + step])):
        x = torch.randn(n, t, C, generator=g) * 3 + 1
        mask = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
        x = torch.where(mask[..., None], x, torch.full_like(x, 1e4))  # huge pads: any leak shows
        out.append((x, mask))
    return out


def _weights(shape, step: int, rank: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(300 + 10 * step + rank))


def _init(m: nn.Module) -> None:
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, C))
        m.bias.copy_(torch.linspace(-1, 1, C))


def _rank_steps(rank: int, world: int, name: str, synced: bool) -> dict:
    """``name`` on this rank's slice for STEPS training steps; returns outputs, grads, running stats."""
    m = nb.norms.create(name, C, layout="image" if name == "bn" else "tokens", momentum=0.3, sync=synced)
    _init(m)
    rec = {"y": [], "gx": [], "gw": [], "gb": []}
    for step in range(STEPS):
        m.zero_grad()
        if name == "bn":
            x = _image_batches(step)[rank].clone().requires_grad_(True)
            y = m(x)
        else:
            xt, mask = _token_batches(step)[rank]
            x = xt.clone().requires_grad_(True)
            y = m(x, mask=mask)
        (y * _weights(y.shape, step, rank)).sum().backward()
        gw, gb = m.weight.grad.clone(), m.bias.grad.clone()
        if world > 1:  # what DDP would sum (and average) over ranks
            torch.distributed.all_reduce(gw), torch.distributed.all_reduce(gb)
        for k, v in (("y", y), ("gx", x.grad), ("gw", gw), ("gb", gb)):
            rec[k].append(v.detach().clone())
    rec["running"] = (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
    return rec


def _reference(name: str) -> list[dict]:
    """One process: BN on the concatenated batch (masked: on the real tokens alone), split back per rank."""
    ref = (nn.BatchNorm2d if name == "bn" else nn.BatchNorm1d)(C, momentum=0.3)
    _init(ref)
    recs = [{"y": [], "gx": [], "gw": [], "gb": []} for _ in range(2)]
    for step in range(STEPS):
        ref.zero_grad()
        if name == "bn":
            parts = [b.clone().requires_grad_(True) for b in _image_batches(step)]
            y = ref(torch.cat(parts))
            ys = list(y.split([4, 3]))
        else:
            toks = _token_batches(step)
            parts = [x.clone().requires_grad_(True) for x, _ in toks]
            real = torch.cat([x[mask] for x, (_, mask) in zip(parts, toks)])  # (N_real, C)
            yr = ref(real).split([int(mask.sum()) for _, mask in toks])
            ys = []
            for (x, mask), yy in zip(toks, yr):
                full = torch.zeros_like(x)
                full[mask] = yy
                ys.append(full)
        sum(((yy * _weights(yy.shape, step, r)).sum() for r, yy in enumerate(ys))).backward()
        for r in range(2):
            recs[r]["y"].append(ys[r].detach().clone())
            recs[r]["gx"].append(parts[r].grad.clone())
            recs[r]["gw"].append(ref.weight.grad.clone())
            recs[r]["gb"].append(ref.bias.grad.clone())
    for r in range(2):
        recs[r]["running"] = (ref.running_mean.clone(), ref.running_var.clone(), int(ref.num_batches_tracked))
    return recs


def _assert_same(got: dict, want: dict) -> None:
    for k in ("y", "gx", "gw", "gb"):
        for step, (a, b) in enumerate(zip(got[k], want[k])):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=k, s=step: f"{k} at step {s}: {m}")
    for a, b in zip(got["running"][:2], want["running"][:2]):
        torch.testing.assert_close(a, b, **TOL)
    assert got["running"][2] == want["running"][2]


CASES = (("bn", True), ("masked_bn", True), ("bn", False))


def _all_cases(rank: int, world: int) -> dict:
    return {case: _rank_steps(rank, world, *case) for case in CASES}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every case in one pair of spawned processes (starting them is the slow part on a busy machine)."""
    return run_ranks(_all_cases, 2, (), tmp_path_factory.mktemp("sync"))


@pytest.mark.parametrize("name", ["bn", "masked_bn"])
def test_synchronized_equals_one_process_on_the_concatenated_batch(ranks, name):
    got = [r[(name, True)] for r in ranks]
    for g, w in zip(got, _reference(name)):
        _assert_same(g, w)
    if name == "masked_bn":  # padded positions: zero output, zero gradient, on every rank
        for r, g in enumerate(got):
            for step in range(STEPS):
                mask = _token_batches(step)[r][1]
                assert not g["y"][step][~mask].any() and not g["gx"][step][~mask].any()


def test_unsynchronized_bn_uses_each_ranks_own_statistics(ranks):
    got = [r[("bn", False)] for r in ranks]
    for rank, g in enumerate(got):
        ref = nn.BatchNorm2d(C, momentum=0.3)
        _init(ref)
        for step in range(STEPS):
            ref.zero_grad()
            x = _image_batches(step)[rank].clone().requires_grad_(True)
            y = ref(x)
            (y * _weights(y.shape, step, rank)).sum().backward()
            torch.testing.assert_close(g["y"][step], y.detach(), **TOL)
            torch.testing.assert_close(g["gx"][step], x.grad, **TOL)
        torch.testing.assert_close(g["running"][0], ref.running_mean, **TOL)
    assert not torch.allclose(got[0]["y"][0], _reference("bn")[0]["y"][0], atol=1e-3), \
        "per-rank statistics must differ from the pooled ones on this data"


@pytest.mark.parametrize("name", ["bn", "masked_bn", "noisy_bn", "batch_renorm"])
def test_sync_option_is_local_bn_in_one_process(name):
    """Without a process group, sync: true is exactly the unsynchronized norm."""
    layout = "image" if name == "bn" else "tokens"
    a = nb.norms.create(name, C, layout=layout, sync=True)
    b = nb.norms.create(name, C, layout=layout)
    assert a.sync and not b.sync
    x = torch.randn(4, 6, C) if layout == "tokens" else torch.randn(4, C, 3, 3)
    torch.manual_seed(1)
    ya = a(x)
    torch.manual_seed(1)
    yb = b(x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_moments_pool_exactly_across_parts():
    """Chan's pooling of per-part (n, sum, M2) equals the statistics of the concatenation (one process)."""
    parts = [torch.randn(n, C) * 100 + 1e3 for n in (1, 7, 0, 4)]
    stats = [sync.local_moments(p, 1) for p in parts]
    mean, var, n = sync.combine(*(torch.stack(t) for t in zip(*stats)))
    full = torch.cat(parts)
    assert int(n) == 12
    torch.testing.assert_close(mean, full.mean(0))
    torch.testing.assert_close(var, full.var(0, unbiased=False))


def test_enable_turns_on_every_site_and_refuses_what_cannot_sync():
    model = nb.models.create("resnet20", norm="bn", width=4)
    n = sync.enable(model)
    assert n > 0 and all(m.sync for m in model.modules() if sync.supports_sync(m))
    with pytest.raises(ValueError, match="cannot be synchronized"):
        sync.enable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
