"""normablate.fold's Linear paths: BN after a Linear, BN before one, the ViT, and what is left alone (reported)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normablate as nb
from normablate.fold import fold_batchnorm, fold_norms


def _warm(model: nn.Module, *inputs) -> nn.Module:
    """Running statistics (and BN affines) away from their init values, then eval."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(*[x * 1.7 + 0.4 for x in inputs])
    return model.eval()


def _same(a: nn.Module, b: nn.Module, *inputs) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), atol=1e-5, rtol=1e-5)


def _bn_count(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


class Tokens(nn.Module):
    def __init__(self, *layers) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("affine,bias", [(True, True), (False, False)])
def test_linear_then_bn_folds_into_the_linear(affine, bias):
    net = Tokens(nn.Linear(6, 8, bias=bias), nb.norms.create("bn", 8, layout="tokens", affine=affine), nn.GELU(),
                 nn.Linear(8, 3))
    x = torch.randn(4, 5, 6)
    _warm(net, x)
    folded, rep = fold_norms(net)
    assert rep.folded == [("layers.1", "layers.0", "linear<-bn")] and rep.left == []
    assert _bn_count(folded) == 0
    _same(folded, net, x)


def test_bn_then_linear_folds_into_the_linear_shape_queries_allowed():
    class PreNorm(nn.Module):  # x + fc(norm(x)), reading the normalized tensor's shape as timm's Attention does
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = nb.norms.create("bn", 6, layout="tokens"), nn.Linear(6, 6)

        def forward(self, x):
            h = self.norm(x)
            n, t, c = h.shape
            return x + self.fc(h).reshape(n, t, c)

    net, x = PreNorm(), torch.randn(3, 7, 6)
    _warm(net, x)
    folded, rep = fold_norms(net)
    assert rep.folded == [("norm", "fc", "bn->linear")]
    _same(folded, net, x)


@pytest.mark.parametrize("norm,ffn,position,n_folded", [("bn", "bn", "before_act", 12), ("ln", "bn", "before_act", 4),
                                                         ("bn", None, "before_act", 8), ("ln", "bn", "after_act", 4),
                                                         ("bn", "bn", "after_act", 12)])
def test_vit_folds_and_keeps_eval_outputs(norm, ffn, position, n_folded):
    """The vit_norms study's model: pre-norm BNs fold into qkv / fc1, BN-in-FFN into fc1 (before_act) or fc2
    (after_act); the final norm (before the class-token pooling) is left and reported."""
    net = nb.models.create("vit", norm=norm, ffn_norm=ffn, ffn_norm_position=position, num_classes=10, embed_dim=32,
                           depth=4, num_heads=2)
    x = torch.randn(6, 3, 32, 32)
    _warm(net, x)
    folded, rep = fold_norms(net)
    assert len(rep.folded) == n_folded
    if norm == "bn":
        assert [n for n, _ in rep.left] == ["norm"] and "neither directly after" in rep.left[0][1]
        assert _bn_count(folded) == 1
    else:
        assert rep.left == [] and _bn_count(folded) == 0
    paths = {p for _, _, p in rep.folded}
    assert ("linear<-bn" in paths) == (ffn is not None and position == "before_act")  # fc1 -> BN
    _same(folded, net, x)
    assert "folded" in str(rep)


def test_bn_not_next_to_a_linear_is_left_and_reported():
    net = Tokens(nn.Linear(6, 8), nn.GELU(), nb.norms.create("bn", 8, layout="tokens"), nn.GELU())
    x = torch.randn(4, 5, 6)
    _warm(net, x)
    folded, rep = fold_norms(net)
    assert rep.folded == [] and rep.left[0][0] == "layers.2" and "neither directly after" in rep.left[0][1]
    assert folded is not net and _bn_count(folded) == 1
    _same(folded, net, x)
    # a Linear whose output also feeds something else: the BN is not its only user
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(6, 6), nb.norms.create("bn", 6, layout="tokens")

        def forward(self, x):
            h = self.fc(x)
            return self.norm(h) + h

    net = _warm(Branch(), x)
    folded, rep = fold_norms(net)
    assert rep.folded == [] and [n for n, _ in rep.left] == ["norm"]
    _same(folded, net, x)


@pytest.mark.parametrize("name", ["masked_bn", "noisy_bn", "batch_renorm"])
def test_variants_that_are_not_plain_bn_are_left_and_reported(name):
    net = Tokens(nn.Linear(6, 8), nb.norms.create(name, 8, layout="tokens"), nn.Linear(8, 3))
    x = torch.randn(4, 5, 6)
    _warm(net, x)
    folded, rep = fold_norms(net)
    assert rep.folded == [] and rep.left[0][0] == "layers.1" and "not a plain BatchNorm" in rep.left[0][1]
    _same(folded, net, x)


def test_image_layout_bn_after_linear_needs_shapes():
    """BatchNorm1d after a Linear normalizes the Linear's features only on 2-D input: folded when example inputs
    show that, left (and said why) when they are not given."""
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 6)
    _warm(net, x)
    folded, rep = fold_norms(net)
    assert rep.folded == [] and "example_inputs" in rep.left[0][1]
    folded, rep = fold_norms(net, (x,))
    assert rep.folded == [("1", "0", "linear<-bn")]
    _same(folded, net, x)
    assert fold_batchnorm(net, (x,))[1] == 1


def test_a_linear_called_twice_is_not_changed():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(6, 6), nb.norms.create("bn", 6, layout="tokens")

        def forward(self, x):
            return self.fc(self.norm(self.fc(x)))

    x = torch.randn(3, 4, 6)
    net = _warm(Twice(), x)
    folded, rep = fold_norms(net)
    assert rep.folded == []
    _same(folded, net, x)


def test_vit_inference_bench_section_runs(tmp_path):
    """`normablate bench --only vit_inference` (tiny): LN and the three BN variants, unfolded and folded, at both
    batch sizes, each with its ratio to LN; the folded rows say how many BNs folded."""
    import csv

    from normablate.bench import run_bench

    _, csv_path = run_bench(tmp_path, tiny=True, sections=["vit_inference"], command="test")
    rows = [r for r in csv.DictReader(open(csv_path)) if r["section"] == "vit_inference"]
    variants = {r["ours"] for r in rows}
    assert variants == {"ln", "bn (unfolded)", "bn folded", "ln + BN-in-FFN (unfolded)", "ln + BN-in-FFN folded",
                        "bn + BN-in-FFN (unfolded)", "bn + BN-in-FFN folded"}
    assert len(rows) == 2 * len(variants) and all(float(r["ratio"]) > 0 for r in rows)
    assert all(r["ratio"] == "1" for r in rows if r["ours"] == "ln")
    notes = {r["ours"]: r["note"] for r in rows}
    assert notes["bn + BN-in-FFN folded"].startswith("3 BN folded; left: norm")  # tiny: depth 1


def test_ratio_ci_brackets_the_paired_ratio():
    from normablate.bench import paired_ratio, ratio_ci

    torch.manual_seed(0)
    b = (torch.rand(40) + 1.0).tolist()
    a = [x * 0.8 * (1 + 0.05 * float(e)) for x, e in zip(b, torch.randn(40))]
    lo, hi = ratio_ci(a, b)
    assert lo <= paired_ratio(a, b) <= hi and 0.75 < lo < hi < 0.85
    assert ratio_ci([1.0] * 5, [2.0] * 5) == (0.5, 0.5)


def test_median_ratio_ci_is_claim_7s_statistic():
    """The ratio of the medians (yao_vit_bn.yaml's pre-registered statistic) and its pair bootstrap: a hand-computed
    case, a CI that brackets it, and a degenerate case."""
    from normablate.bench.timing import median_ratio, median_ratio_ci

    assert median_ratio([1.0, 3.0, 2.0], [4.0, 5.0, 6.0]) == pytest.approx(2.0 / 5.0)
    torch.manual_seed(1)
    b = (torch.rand(40) + 1.0).tolist()
    a = [x * 0.7 * (1 + 0.05 * float(e)) for x, e in zip(b, torch.randn(40))]
    lo, hi = median_ratio_ci(a, b)
    assert lo <= median_ratio(a, b) <= hi and 0.6 < lo < hi < 0.8
    assert median_ratio_ci([1.0] * 5, [2.0] * 5) == (0.5, 0.5)
