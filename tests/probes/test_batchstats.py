"""Batch-statistics probe (Shen et al. 2020): closed forms on one layer, masking, and no effect on training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normablate import norms
from normablate.config import load_config
from normablate.errors import ConfigError
from normablate.probes import batch_stats, stat_layers
from normablate.train import train

D = torch.float64


def _layer(name: str, c: int = 5, **kw) -> nn.Module:
    m = norms.create(name, c, layout="tokens", **kw).to(D).train()
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=D))
            m.bias.copy_(torch.linspace(-1.0, 1.0, c, dtype=D))
        if hasattr(m, "running_mean") and m.running_mean is not None:
            m.running_mean.copy_(torch.linspace(-0.3, 0.4, c, dtype=D))
            m.running_var.copy_(torch.linspace(0.5, 3.0, c, dtype=D))
    return m


def _probe(m: nn.Module, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    def loss_fn():  # L = 1/2 sum over real tokens (y - t)^2: dL/dy = y - t
        y = m(x, mask)
        keep = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
        return 0.5 * ((y - t)[keep] ** 2).sum()

    return batch_stats(loss_fn, [("layer", m)])["layer"]


@torch.no_grad()
def _closed_form(m, xs: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None, d: torch.Tensor | None = None):
    """Measures of a BN on the real tokens ``xs`` (M, C) with targets ``t`` (M, C), by hand (Ioffe & Szegedy,
    Sec. 3): y = w * (xhat * r + d) + b, xhat = (x - mu) / sqrt(var + eps); r, d constants."""
    mu, var = xs.mean(0), xs.var(0, unbiased=False)
    n, eps = xs.shape[0], m.eps
    r = torch.ones_like(mu) if r is None else r
    d = torch.zeros_like(mu) if d is None else d
    s = torch.sqrt(var + eps)
    y = m.weight * ((xs - mu) / s * r + d) + m.bias
    g = y - t  # dL/dy
    d_mu = (g * (-m.weight * r / s)).sum(0)
    d_var = (g * m.weight * r * (xs - mu) * -0.5 * (var + eps) ** -1.5).sum(0)
    rm, rv = m.running_mean, m.running_var
    return {"mean_dist": float(((mu - rm).abs() / torch.sqrt(rv + eps)).mean()),
            "var_dist": float(((var * n / (n - 1) - rv).abs() / (rv + eps)).mean()),
            "grad_mean": float(d_mu.norm()), "grad_var": float(d_var.norm())}


def test_bn_closed_form_and_no_side_effects():
    torch.manual_seed(0)
    m = _layer("bn")
    x, t = torch.randn(4, 6, 5, dtype=D) * 2 + 1, torch.randn(4, 6, 5, dtype=D)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    got = _probe(m, x, t)
    want = _closed_form(m, x.reshape(-1, 5), t.reshape(-1, 5))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-10), k
    assert "forward" not in m.__dict__, "the layer's own forward is back"
    for k, v in m.state_dict().items():  # the recomputation updates no running statistic
        assert torch.equal(v, state[k]), k
    assert m.weight.grad is None, "parameters' .grad untouched"


def test_batch_renorm_closed_form_with_r_and_d_as_constants():
    torch.manual_seed(1)
    m = _layer("batch_renorm", r_max=3.0, d_max=5.0, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    x, t = torch.randn(3, 7, 5, dtype=D) * 1.3 + 0.2, torch.randn(3, 7, 5, dtype=D)
    xs = x.reshape(-1, 5)
    mu, var = xs.mean(0), xs.var(0, unbiased=False)
    run_std = torch.sqrt(m.running_var + m.eps)
    r = (torch.sqrt(var + m.eps) / run_std).clamp(1 / 3, 3)
    d = ((mu - m.running_mean) / run_std).clamp(-5, 5)
    assert not torch.allclose(r, torch.ones_like(r)), "r is exercised"
    got = _probe(m, x, t)
    want = _closed_form(m, xs, t.reshape(-1, 5), r, d)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-10), k


def test_masked_bn_ignores_padding_and_bn_does_not():
    torch.manual_seed(2)
    x, t = torch.randn(3, 8, 5, dtype=D), torch.randn(3, 8, 5, dtype=D)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = mask[2, 2:] = False
    m = _layer("masked_bn")
    got = _probe(m, x, t, mask)
    want = _closed_form(m, x[mask], t[mask])  # BN on the real tokens alone
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-10), k
    x2 = x.clone()
    x2[~mask] = 1e3  # garbage at the pads changes nothing
    assert _probe(m, x2, t, mask) == pytest.approx(got, rel=1e-12)
    b = _layer("bn")  # plain BN: the pads enter its statistics (that is the ablation)
    assert _probe(b, x2, t, mask)["mean_dist"] > 10 * got["mean_dist"]


def test_ghost_bn_per_group():
    torch.manual_seed(3)
    x, t = torch.randn(4, 3, 5, dtype=D), torch.randn(4, 3, 5, dtype=D)
    m = _layer("bn", ghost_batch_size=2)
    got = _probe(m, x, t)
    parts = [_closed_form(m, x[i:i + 2].reshape(-1, 5), t[i:i + 2].reshape(-1, 5)) for i in (0, 2)]
    for k in ("mean_dist", "var_dist"):  # averaged over groups
        assert got[k] == pytest.approx((parts[0][k] + parts[1][k]) / 2, rel=1e-10), k
    for k in ("grad_mean", "grad_var"):  # one norm over every (group, channel)
        assert got[k] == pytest.approx(math.hypot(parts[0][k], parts[1][k]), rel=1e-10), k


def test_powernorm_gradient_in_warmup_and_zero_after():
    torch.manual_seed(4)
    x, t = torch.randn(3, 6, 5, dtype=D) + 0.5, torch.randn(3, 6, 5, dtype=D)
    m = _layer("powernorm", warmup_iters=10)
    phi_b = (x.reshape(-1, 5) ** 2).mean(0)
    run = m.running_phi.clone()
    got = _probe(m, x, t)
    assert "mean_dist" not in got and "grad_mean" not in got  # no mean statistic in PowerNorm
    assert got["var_dist"] == pytest.approx(float(((phi_b - run).abs() / (run + m.eps)).mean()), rel=1e-10)
    w, b = m.weight.detach(), m.bias.detach()
    y = w * x / torch.sqrt(phi_b + m.eps) + b  # warm-up: divides by the batch psi_B
    want = ((y - t) * w * x * -0.5 * (phi_b + m.eps) ** -1.5).sum((0, 1))
    assert got["grad_var"] == pytest.approx(float(want.norm()), rel=1e-10)
    m2 = _layer("powernorm", warmup_iters=0)  # Algorithm 1: the running psi from the first step
    assert _probe(m2, x, t)["grad_var"] == 0.0


def test_noisy_bn_uses_the_training_noise_draw():
    torch.manual_seed(5)
    m = _layer("noisy_bn")
    x = torch.randn(4, 6, 5, dtype=D)
    rng = torch.get_rng_state()
    want = m(x)
    torch.set_rng_state(rng)
    seen = {}

    def loss_fn():
        torch.set_rng_state(rng)
        y = m(x)
        seen["y"] = y.detach()
        return y.sum()

    batch_stats(loss_fn, [("layer", m)])
    assert torch.allclose(seen["y"], want, atol=1e-12)


def test_stat_layers_and_config_error():
    from normablate.models import create

    net = create("transformer_lm", norm="masked_bn", n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8)
    names = [n for n, _ in stat_layers(net)]
    assert names and all(isinstance(dict(net.named_modules())[n], nn.modules.batchnorm._BatchNorm) for n in names)
    assert stat_layers(create("transformer_lm", norm="ln", n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                              block_size=8)) == []
    with pytest.raises(ConfigError, match="probes.batchstats=true needs probes.enabled=true"):
        load_config(None, ["probes.batchstats=true"])


LM = ["model.backbone=transformer_lm", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data.source=synthetic",
      "data.mode=samples", "data.block_size=32", "data.batch_size=8", "data.val_batch_size=8", "trainer.val_batches=1",
      "optim.name=adamw", "optim.lr=0.003", "trainer.max_steps=5", "trainer.val_every=5", "trainer.progress=false",
      "trainer.log_every=1"]


@pytest.mark.parametrize("norm", ["masked_bn", pytest.param("powernorm", marks=pytest.mark.slow)])
def test_batchstat_probe_leaves_training_untouched(tmp_path, norm):
    """A probed run's metrics equal an unprobed run's step for step; the series reach history and RunResult."""
    off = train(load_config(None, [*LM, f"model.norm={norm}", f"trainer.log_dir={tmp_path}", "experiment=bs_off"]))
    on = train(load_config(None, [*LM, f"model.norm={norm}", f"trainer.log_dir={tmp_path}", "experiment=bs_on",
                                  "probes.enabled=true", "probes.every=2", "probes.landscape=false",
                                  "probes.ics=false", "probes.batchstats=true"]))
    keys = [k for k in off.history if not k.startswith("probe/")]
    assert keys and {k: off.history[k] for k in keys} == {k: on.history[k] for k in keys}
    assert off.final == on.final
    series = [k for k in on.history if k.startswith("probe/bstat_")]
    want = {"grad_var", "var_dist"} | ({"grad_mean", "mean_dist"} if norm == "masked_bn" else set())
    assert {k.split("/")[1][len("bstat_"):] for k in series} == want
    for k in series:
        assert [s for s, _ in on.history[k]] == [1, 3, 5] and all(math.isfinite(v) for _, v in on.history[k]), k
        assert on.probes[k] == pytest.approx(sum(v for _, v in on.history[k]) / 3)
    if norm == "masked_bn":
        assert all(on.probes[k] > 0 for k in series)
    a = torch.load(f"{off.run_dir}/last.ckpt", weights_only=False)
    b = torch.load(f"{on.run_dir}/last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_report_table_from_histories(tmp_path):
    """The report's batch-statistics table: layer mean of each run's step means, step CV, mean over seeds."""
    import pandas as pd

    from normablate.analysis.data import StudyData
    from normablate.report import probes as rp

    trials = pd.DataFrame({"trial": [0, 1, 2], "norm": ["masked_bn", "masked_bn", "ln"], "seed": [0, 1, 0],
                           "diverged": [False, False, False], "state": ["complete"] * 3})

    def hist(scale):  # two layers, steps 1 and 3
        return {"probe/loss": [[1, 1.0], [3, 0.9]],
                "probe/bstat_grad_mean/a": [[1, 1.0 * scale], [3, 3.0 * scale]],
                "probe/bstat_grad_mean/b": [[1, 3.0 * scale], [3, 5.0 * scale]],
                "probe/bstat_mean_dist/a": [[1, 0.2], [3, 0.4]]}

    data = StudyData("s", "", None, trials, 3, histories={0: hist(1.0), 1: hist(2.0), 2: {"probe/loss": [[1, 1.0]]}},
                     group_cols=["norm"])
    sec = rp.section(data, tmp_path)
    assert "Batch-statistics fluctuation" in sec.markdown and "Loss landscape" not in sec.markdown
    t = sec.tables["probes_batchstats.csv"].set_index("norm")
    # run 0: layer means 2 and 4 -> 3; run 1: 6; mean over seeds 4.5
    assert t.loc["masked_bn", "grad_mean_mean"] == pytest.approx(4.5)
    assert t.loc["masked_bn", "mean_dist_mean"] == pytest.approx(0.3)
    # step series of the layer mean: [2, 4] (std 1.414.., mean 3) in both runs (scale cancels)
    assert t.loc["masked_bn", "grad_mean_cv_mean"] == pytest.approx(2 ** 0.5 / 3)
    assert math.isnan(t.loc["ln", "grad_mean_mean"])
    per = sec.tables["probes_batchstats_per_run.csv"]
    row = per[(per["trial"] == 1) & (per["layer"] == "b")].iloc[0]
    assert row["grad_mean"] == pytest.approx(8.0)
    assert rp.definitions(data) == [rp.BSTAT_DEFINITION]
