"""Probes (Santurkar et al. 2018): closed forms on a quadratic, ICS by hand, and no effect on training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normablate.config import load_config
from normablate.errors import ConfigError
from normablate.probes import ProbeCallback, ics, landscape, loss_and_grad
from normablate.train import train


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T H w - b^T w: grad = H w - b, Hessian H everywhere."""

    def __init__(self, H: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.H, self.b = H, b
        self.w = nn.Parameter(torch.randn(len(b), dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        return 0.5 * self.w @ self.H @ self.w - self.b @ self.w


def test_landscape_closed_forms_on_a_quadratic():
    torch.manual_seed(1)
    A = torch.randn(6, 6, dtype=torch.float64)
    H = A @ A.T + 0.1 * torch.eye(6, dtype=torch.float64)
    m = Quadratic(H, torch.randn(6, dtype=torch.float64))
    params = [m.w]
    x0 = m.w.detach().clone()
    L0, (g,) = loss_and_grad(m.loss, params)
    assert torch.allclose(g, H @ x0 - m.b)
    etas = [0.01, 0.02, 0.05]
    out = landscape(m.loss, params, [g], etas)
    assert torch.equal(m.w.detach(), x0), "parameters are put back exactly"
    Hg = H @ g
    # grad L(x) - grad L(x - eta g) = eta H g
    assert out["grad_pred"] == pytest.approx(max(etas) * float(Hg.norm()), rel=1e-9)
    assert out["beta"] == pytest.approx(float(Hg.norm() / g.norm()), rel=1e-9)
    # L(x - eta g) = L(x) - eta g.g + eta^2/2 g.H.g
    losses = [L0 - e * float(g @ g) + 0.5 * e * e * float(g @ Hg) for e in etas]
    for e, want in zip(etas, losses):
        assert out[f"loss@{e:g}"] == pytest.approx(want, rel=1e-9)
    assert out["loss_min"] == pytest.approx(min(losses)) and out["loss_max"] == pytest.approx(max(losses))
    assert out["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert out["beta"] <= float(torch.linalg.eigvalsh(H).max()) + 1e-9  # the true smoothness bounds it


def _sgd_step(params, grads, lr):
    with torch.no_grad():
        return [p - lr * g for p, g in zip(params, grads)]


def test_ics_is_zero_for_a_one_layer_model():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def loss_fn():
        return ((net(x) - y) ** 2).mean()

    params = list(net.parameters())  # weight, bias: no parameter precedes the weight
    before = [p.detach().clone() for p in params]
    _, g = loss_and_grad(loss_fn, params)
    after = _sgd_step(before, g, 0.5)
    (r,) = ics(loss_fn, params, [0], before, after, g)
    assert r["l2"] == 0.0 and r["cos"] == pytest.approx(1.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "parameters back to their entry values"


def test_ics_matches_a_hand_computation_on_a_two_layer_linear_model():
    torch.manual_seed(0)
    W1 = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    W2 = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)

    def loss_fn():  # L = 1/2 ||W2 W1 x - y||^2
        return 0.5 * ((W2 @ W1 @ x - y) ** 2).sum()

    lr = 0.01
    params = [W1, W2]
    before = [p.detach().clone() for p in params]
    _, g = loss_and_grad(loss_fn, params)
    after = _sgd_step(before, g, lr)
    r1, r2 = ics(loss_fn, params, [0, 1], before, after, g)
    # by hand: E = W2 W1 x - y; G2 = E (W1 x)^T; G2' uses W1' = W1 - lr * G1, G1 = W2^T E x^T
    w1, w2 = before
    E = w2 @ w1 @ x - y
    G1 = w2.T @ E @ x.T
    G2 = E @ (w1 @ x).T
    w1n = w1 - lr * G1
    G2p = (w2 @ w1n @ x - y) @ (w1n @ x).T
    assert torch.allclose(g[0], G1) and torch.allclose(g[1], G2)
    assert r1["l2"] == 0.0
    assert r2["l2"] == pytest.approx(float((G2 - G2p).norm()), rel=1e-10)
    assert r2["cos"] == pytest.approx(float((G2 * G2p).sum() / (G2.norm() * G2p.norm())), rel=1e-10)
    assert r2["l2"] > 0


TINY = [
    "model.backbone=vgg11", "model.width=0.125", "data.source=synthetic", "data.batch_size=32",
    "data.train_limit=512", "data.val_limit=128", "data.val_batch_size=64", "optim.lr=0.05",
    "trainer.max_steps=8", "trainer.val_every=4", "trainer.progress=false", "trainer.log_every=1",
]


@pytest.mark.parametrize("norm", ["noisy_bn", "none"])
def test_probes_leave_training_untouched(tmp_path, norm):
    """Same metrics step for step with probes on and off; L(x) in the probe is the logged training loss."""
    off = train(load_config(None, [*TINY, f"model.norm={norm}", f"trainer.log_dir={tmp_path}", "experiment=probes_off"]))
    on = train(load_config(None, [*TINY, f"model.norm={norm}", f"trainer.log_dir={tmp_path}", "experiment=probes_on",
                                  "probes.enabled=true", "probes.every=3", "probes.layers=[features.0.conv, features.4.conv]"]))
    keys = [k for k in off.history if not k.startswith("probe/")]
    assert keys and {k: off.history[k] for k in keys} == {k: on.history[k] for k in keys}
    assert off.final == on.final and "probe/beta" not in off.history
    steps = [s for s, _ in on.history["probe/loss"]]
    assert steps == [1, 4, 7]
    train_loss = dict((int(s), v) for s, v in on.history["train/loss"])
    for s, v in on.history["probe/loss"]:
        assert v == pytest.approx(train_loss[s], rel=1e-6)  # same batch statistics, same noise draw
    for k in ("probe/loss_range", "probe/grad_pred", "probe/beta", "probe/ics_l2/features.0.conv",
              "probe/ics_cos/features.4.conv"):
        assert len(on.history[k]) == 3 and all(math.isfinite(v) for _, v in on.history[k]), k
    assert all(v == 0.0 for _, v in on.history["probe/ics_l2/features.0.conv"])  # no earlier layer
    assert on.probes["probe/beta"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(on.run_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("probe/beta")] == [1, 4, 7]
    assert "probe/ics_cos/features.4.conv" in events.Tags()["scalars"]
    # the model's final state is the same too (parameters, running statistics, num_batches_tracked)
    a = torch.load(f"{off.run_dir}/last.ckpt", weights_only=False)
    b = torch.load(f"{on.run_dir}/last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_probe_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="probes.every"):
        load_config(None, ["probes.every=0"])
    with pytest.raises(ConfigError, match="probes.step_sizes"):
        load_config(None, ["probes.step_sizes=[]"])
    with pytest.raises(ConfigError, match="did you mean probes.every"):
        load_config(None, ["probes.evry=3"])
    with pytest.raises(ConfigError, match="probes.layers: \\['nope'\\] are not weight layers of 'vgg11'"):
        load_config(None, [*TINY, "probes.enabled=true", "probes.layers=[nope]"])  # before anything is built
    cfg = load_config(None, [*TINY, "probes.enabled=true"])
    cfg.probes.layers = ["nope"]
    from normablate.models import create

    with pytest.raises(ConfigError, match="nope.*valid: features.0.conv"):
        ProbeCallback(create("vgg11", norm="bn", width=0.125), cfg.probes)


@pytest.mark.slow
def test_landscape_quick_spec_end_to_end(tmp_path):
    """The shipped CI study (embedded data), shortened: probes reach the trial records and the report's views."""
    from pathlib import Path

    from normablate.report import write_report
    from normablate.sweep import run_sweep

    spec = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "landscape_quick.yaml"
    res = run_sweep(spec, overrides=[f"trainer.log_dir={tmp_path}", "trainer.max_steps=4", "trainer.val_every=4",
                                     "probes.every=2", "data.train_limit=512", "data.val_limit=100",
                                     "data.val_batch_size=100", "trainer.threads=1"], verbose=False)
    assert res.complete and res.counts.total == 12
    for t in res.study().get_trials():
        ua = t.user_attrs
        assert [s for s, _ in ua["history"]["probe/beta"]] == [1, 3]
        assert set(ua["probes"]) >= {"probe/loss_range", "probe/grad_pred", "probe/beta", "probe/ics_cos/head"}
    out = write_report(res.study_name, storage=res.storage)
    md = (out / "summary.md").read_text()
    assert "## Loss landscape and internal covariate shift (probes)" in md and "**Conclusion (lr=0.02):**" in md
    assert (out / "probe_landscape.png").stat().st_size > 0 and (out / "probe_ics.png").stat().st_size > 0


def test_tied_weight_counts_once_under_its_owner():
    """The LM's output layer shares its tensor with the token embedding: one layer, the embedding's (issue 26).
    Listed twice, the head would sit at the embedding's place in the update order, so its ICS would always be 0
    and would pull the layer-mean ICS towards 0."""
    from normablate.models import create
    from normablate.probes.ics import weight_layers

    lm = create("transformer_lm", norm="ln", n_layer=1, n_embd=16, n_head=2, block_size=8)
    assert lm.head.weight is lm.tok.weight
    names = [n for n, _ in weight_layers(lm)]
    assert "tok" in names and "head" not in names
    assert len({id(w) for _, w in weight_layers(lm)}) == len(names)
    cfg = load_config(None, ["probes.enabled=true"])
    cb = ProbeCallback(lm, cfg.probes)
    assert [n for n, _ in cb.layers] == names and len({i for _, i in cb.layers}) == len(names)
    assert cb.params[cb.layers[0][1]] is lm.tok.weight
    cfg.probes.layers = ["head"]
    with pytest.raises(ConfigError, match=r"\['head'\] are not weight layers.*valid: tok"):
        ProbeCallback(lm, cfg.probes)
    untied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert [n for n, _ in weight_layers(untied)] == ["0", "1"]
