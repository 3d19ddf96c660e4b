"""Any timm model by name (models/timm_zoo.py) and ``normablate.swap_norms`` (surgery.py).

Three timm families, each small: a CNN with BatchNorm2d (resnet10t), a ConvNeXt with LayerNorm2d (convnext_atto;
also with ``conv_mlp=False``, whose blocks run LayerNorm on channels-last NHWC), and a ViT (vit_tiny at 32x32).
Each is checked two ways: the swapped model holds only the chosen norm (``none``: no norm at all) and runs
forward; and the SAME norm as timm's, with timm's weights loaded, gives timm's outputs to 1e-6, which proves each
site got the right layout and the right place."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import normablate as nb
from normablate import norms
from normablate.errors import ConfigError
from normablate.surgery import ChannelsFirst, NormAct, looks_like_norm

timm = pytest.importorskip("timm")

# name -> (timm.create_model kwargs: tiny widths/depths, the norm spec equal to timm's own)
FAMILIES = {
    "resnet10t": ({"channels": (8, 16, 32, 64), "stem_width": 8}, {"name": "bn"}),
    "convnext_atto": ({"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}, {"name": "ln", "eps": 1e-6}),
    "convnext_atto/nhwc": ({"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "conv_mlp": False},
                           {"name": "ln", "eps": 1e-6}),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
                             {"name": "ln", "eps": 1e-6}),
}
X = torch.randn(4, 3, 32, 32)


def arch(family: str) -> str:
    return family.split("/")[0]


def create(family: str, norm, **extra) -> nn.Module:
    kwargs, _ = FAMILIES[family]
    return nb.models.create(f"timm/{arch(family)}", norm=norm, num_classes=10, **kwargs, **extra)


def norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if looks_like_norm(m)}


@pytest.mark.parametrize("norm", ["bn", "ln", "rms", "gn", "none"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_the_chosen_norm_and_forward(family, norm):
    model = create(family, norm)
    if norm == "none":
        assert norm_types(model) == set()
        assert not any(isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm))
                       for m in model.modules())
    else:
        assert norm_types(model) == {type(norms.create(norm, 8))}
    n_sites = sum(isinstance(m, type(norms.create(norm, 8))) for m in model.modules())
    assert norm == "none" or n_sites >= 5
    y = model(X)
    assert y.shape == (4, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("route", ["create", "swap_norms"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_norm_with_timm_weights_gives_timm_outputs(family, route):
    kwargs, same = FAMILIES[family]
    ref = timm.create_model(arch(family), num_classes=10, **kwargs)
    if route == "create":
        model = create(family, same)
    else:
        model = copy.deepcopy(ref)
        report = nb.swap_norms(model, same)
        assert len(report) == sum(looks_like_norm(m) for m in ref.modules()) >= 5
    assert norm_types(model) == {type(norms.create(same["name"], 8))}
    model.load_state_dict(ref.state_dict())  # same names, same shapes: a norm in a wrong place would not load
    for train in (True, False):  # batch statistics, then the running statistics both updated
        ref.train(train), model.train(train)
        torch.testing.assert_close(model(X), ref(X), rtol=0, atol=1e-6)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_nhwc_sites_are_tokens_and_the_rest_image():
    model = timm.create_model("convnext_atto", num_classes=10, **FAMILIES["convnext_atto/nhwc"][0])
    report = nb.swap_norms(model, "bn")
    assert report.layouts["stages.0.blocks.0.norm"] == "tokens"  # LayerNorm between permutes to NHWC and back
    assert report.layouts["stem.1"] == "image" and report.layouts["head.norm"] == "image"  # LayerNorm2d
    assert report.counts == {"LayerNorm": 4, "LayerNorm2d": 5}
    # BN at an NHWC site normalizes each channel over N, H, W: equal to BatchNorm2d on the NCHW tensor
    block = model.stages[0].blocks[0]
    x = torch.randn(4, 8, 8, 8)
    nhwc = block.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(nhwc, nn.BatchNorm2d(8)(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", norms.available())
def test_every_registered_norm_at_nhwc_and_nchw_sites(norm):
    """The ConvNeXt with NHWC block norms (tokens layout on (N, H, W, C)) and NCHW stem/downsample norms: every
    registered norm builds, trains a step's forward/backward and evaluates, finite."""
    model = create("convnext_atto/nhwc", norm)
    model(X).sum().backward()
    assert torch.isfinite(model.eval()(X)).all()


def test_norm_layer_route_keeps_timm_init():
    """ResNet takes ``norm_layer``: our BN goes in through it, so timm's zero-init of each block's last norm holds
    (module surgery would leave a fresh gamma of 1)."""
    model = create("resnet10t", "bn")
    assert model.layer1[0].bn2.weight.abs().sum() == 0 and model.layer1[0].bn1.weight.eq(1).all()


def test_timm_options_and_facts():
    info = nb.models.info("timm/vit_tiny_patch16_224")
    assert info.layout == "tokens" and info.task == "classification"
    assert info.inputs == {"img_size": "image_size"} and info.options["pretrained"] is False
    assert {"depth", "embed_dim", "num_classes", "in_chans"} <= set(info.options) and "norm_layer" not in info.options
    assert nb.models.info("timm/convnext_atto").layout == "image" and nb.models.info("timm/resnet10t").inputs == {}
    with pytest.raises(ConfigError, match="no option 'norm_layer'"):
        nb.models.create("timm/resnet10t", norm="bn", norm_layer=None)


def test_timm_refusals_name_the_problem():
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet10tt'.*did you mean 'resnet10t'"):
        nb.models.info("timm/resnet10tt")
    with pytest.raises(ConfigError, match="pretrained=True is refused.*no hub"):
        create("resnet10t", "bn", pretrained=True)
    with pytest.raises(ConfigError, match=r"convnextv2_atto.*stages\.0\.blocks\.0\.mlp\.grn \(GlobalResponseNorm\)"):
        nb.models.create("timm/convnextv2_atto", norm="ln", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    with pytest.raises(ConfigError, match="cannot be built with"):
        nb.models.create("timm/convnext_atto", norm="ln", depths="deep")
    with pytest.raises(ConfigError, match="'nf_resnet26' has no normalization layer.*use norm 'none', not 'bn'"):
        nb.models.create("timm/nf_resnet26", norm="bn")  # a run labelled bn would hold no BN


# --- swap_norms on a user's own module ----------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.seq = nn.Conv1d(8, 8, 1)
        self.bn1d = nn.BatchNorm1d(8)  # (N, C, L)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))  # (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).flatten(2)  # (N, 8, L)
        x = self.bn1d(self.seq(x)).mean(-1)  # (N, 8)
        return self.head(self.ln(self.fc(x)))


@pytest.mark.parametrize("error", [RuntimeError, NotImplementedError])
def test_a_model_the_meta_device_cannot_build_is_a_config_error_naming_it(monkeypatch, error):
    def refuse(*args, **kwargs):
        raise error("no meta kernel for aten::made_up")

    monkeypatch.setattr(timm, "create_model", refuse)
    with pytest.raises(ConfigError, match=rf"timm model 'resnet10t' cannot be built on the meta device.*"
                                          rf"{error.__name__}: no meta kernel for aten::made_up"):
        nb.models.create("timm/resnet10t", norm="bn", channels=(8, 16, 32, 64), stem_width=12)  # no cached plan


def test_swap_norms_reports_and_replaces_in_place():
    net = Net()
    report = nb.swap_norms(net, "rms")
    assert report.module is net
    assert report.counts == {"BatchNorm2d": 1, "BatchNorm1d": 2, "LayerNorm": 1}
    assert report.sites == {"bn": "BatchNorm2d", "bn1d": "BatchNorm1d", "ln": "LayerNorm", "head.1": "BatchNorm1d"}
    assert report.layouts == {"bn": "image", "bn1d": "tokens", "ln": "tokens", "head.1": "tokens"}
    assert "4 site(s) -> 'rms'" in str(report)
    assert isinstance(net.bn1d, ChannelsFirst) and isinstance(net.head[1], ChannelsFirst)
    assert norm_types(net) == {type(norms.create("rms", 8))}
    assert net(torch.randn(2, 3, 4, 4)).shape == (2, 16)


def test_swap_norms_same_norm_equals_torch_on_every_site():
    ref = Net()
    for m in ref.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.normal_(m.weight), nn.init.normal_(m.bias)
    ref.double()  # the (N, C, L) site runs channels-last kernels: float32 rounds differently (1.5e-6 seen)
    net = copy.deepcopy(ref)
    nb.swap_norms(net, "bn")
    net.ln = copy.deepcopy(ref.ln)  # compare where bn replaced a BatchNorm1d/2d
    state = ref.state_dict()  # ChannelsFirst adds one level: bn1d.norm.weight is bn1d.weight
    net.load_state_dict({k: state[k.replace(".norm.", ".")] for k in net.state_dict()})
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), net.train(train)
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-6)


def test_swap_norms_keeps_timm_activation_and_sharing_and_root():
    from timm.layers import BatchNormAct2d

    act = BatchNormAct2d(8, act_layer=nn.ReLU)
    nn.init.normal_(act.bias)
    shared = nn.LayerNorm(8)
    model = nn.Sequential(act, nn.Flatten(2), nn.Identity())
    model.a, model.b = nn.Sequential(shared), nn.Sequential(shared)
    report = nb.swap_norms(model, "bn")
    assert isinstance(model[0], NormAct) and isinstance(model[0].act, nn.ReLU)
    assert model.a[0] is model.b[0] and len(report) == 2  # a shared norm stays one shared site
    model[0].norm.load_state_dict(act.state_dict())
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(model[0](x), act(x), rtol=0, atol=1e-6)
    assert (model[0](x) >= 0).all()  # the ReLU is kept
    root = nb.swap_norms(nn.LayerNorm(8), "none")
    assert type(root.module).__name__ == "Identity" and root.sites == {"(root)": "LayerNorm"}


def test_timm_blocks_named_like_norms_are_containers():
    """timm's ConvNormAct (RegNet, CSPNet, RepVGG) is a block: its BatchNormAct2d child is the site."""
    from timm.layers import ConvNormAct

    model = nn.Sequential(ConvNormAct(3, 8, 3))
    report = nb.swap_norms(model, "gn")
    assert report.sites == {"0.bn": "BatchNormAct2d"} and isinstance(model[0].conv, nn.Conv2d)
    assert isinstance(model[0].bn, NormAct) and isinstance(model[0].bn.act, nn.ReLU)


def test_swap_norms_refuses_by_name_and_changes_nothing():
    class MyNorm(nn.Module):  # a user's norm class: its layout is not known unless given
        is_normalization = True

        def __init__(self) -> None:
            super().__init__()
            self.num_features = 8

        def forward(self, x):
            return x

    model = nn.Sequential(nn.BatchNorm2d(8), nn.BatchNorm3d(8), nn.LocalResponseNorm(2), nn.LayerNorm((8, 4)))
    before = [type(m) for m in model]
    with pytest.raises(ConfigError) as e:
        nb.swap_norms(model, "ln")
    for site in ("1 (BatchNorm3d)", "2 (LocalResponseNorm)", "3 (LayerNorm)"):
        assert site in str(e.value)
    assert "0 (BatchNorm2d)" not in str(e.value) and [type(m) for m in model] == before  # untouched
    with pytest.raises(ConfigError, match=r"0 \(MyNorm\)"):
        nb.swap_norms(nn.Sequential(MyNorm()), "ln")
    assert nb.swap_norms(nn.Sequential(MyNorm()), "ln", layout="tokens").layouts == {"0": "tokens"}
    with pytest.raises(ConfigError, match="layout 'nchw'"):
        nb.swap_norms(nn.Sequential(MyNorm()), "ln", layout="nchw")


def test_swap_norms_option_spec_and_resolved_layer():
    net = Net()
    nb.swap_norms(net, {"name": "gn", "num_groups": 2})
    assert net.bn.num_groups == 2 and net.bn.layout == "image" and net.ln.layout == "tokens"
    net = Net()
    nb.swap_norms(net, norms.resolve({"name": "ln", "eps": 1e-3}, "image"))  # re-resolved per site layout
    assert net.bn.layout == "image" and net.ln.layout == "tokens" and net.ln.eps == 1e-3
    with pytest.raises(ConfigError, match="unknown option"):
        nb.swap_norms(Net(), {"name": "ln", "bogus": 1})


def test_package_import_stays_light():
    """``import normablate`` imports neither torch's model code nor timm; ``swap_norms`` is loaded on first use."""
    import subprocess

    code = ("import sys, normablate; assert 'timm' not in sys.modules and 'normablate.surgery' not in sys.modules;"
            "normablate.swap_norms; assert 'normablate.surgery' in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- through a config ---------------------------------------------------------------------------------------------

TINY_TIMM = [
    "model.backbone=timm/resnet10t", "model.channels=[8,16,32,64]", "model.stem_width=8", "data.source=synthetic",
    "data.batch_size=16", "data.train_limit=64", "data.val_limit=32", "data.test_limit=32", "data.val_batch_size=32",
    "data.augment=false", "trainer.max_steps=2", "trainer.val_every=2", "trainer.progress=false", "experiment=t",
]


def test_train_a_timm_backbone_from_a_config(tmp_path):
    from normablate.config import load_config
    from normablate.train import train

    result = train(load_config(None, [*TINY_TIMM, "model.norm=gn", f"trainer.log_dir={tmp_path}"]))
    assert result.status == "completed" and result.steps == 2
    assert (tmp_path / "t" / "timm_resnet10t-gn-lr0.1-bs16-s0" / "result.json").exists()  # one folder, no "timm/"
    assert 0.0 <= result.test["test/acc"] <= 1.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.backbone=timm/convnextv2_atto"], r"cannot swap 12 normalization.*stages\.0\.blocks\.0\.mlp\.grn "
                                               r"\(GlobalResponseNorm\)"),
    (["model.backbone=timm/resnet10t", "model.pretrained=true"], r"pretrained=True is refused"),
    (["model.backbone=timm/resnet10tt"], r"unknown timm model 'resnet10tt'.*did you mean 'resnet10t'"),
    (["model.backbone=timm/resnet10t", "model.norm_layer=bn"], r"has no option 'norm_layer'"),
])
def test_bad_timm_config_is_refused_before_anything_runs(tmp_path, capsys, overrides, message):
    import re

    from normablate.cli import main

    code = main(["train", f"trainer.log_dir={tmp_path}", "data.source=synthetic", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_a_torch_class_as_the_norm_is_ours_not_a_leftover():
    """``model.norm: torch.nn:GroupNorm``-style specs build PyTorch classes: they are the run's norm, not timm's
    norms left in place."""
    def gn2(num_features, layout="image"):  # a user's factory returning a PyTorch class
        return nn.GroupNorm(2, num_features)

    model = create("convnext_atto", gn2)
    assert norm_types(model) == {nn.GroupNorm} and model(X).shape == (4, 10)
