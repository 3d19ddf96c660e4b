"""The GPU study specs (configs/studies/gpu/): the anchors carry the published recipe they claim to reproduce, every
spec's header states its purpose, cost and command, the check needs neither the data nor the network, and the
ResNet-18 CIFAR stem the anchors use is kuangliu/pytorch-cifar's ResNet18."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

import normablate as nb
from normablate.cli import main
from normablate.config import epochs_to_steps, load_config
from normablate.errors import ConfigError
from normablate.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "configs" / "studies" / "gpu"
SPECS = sorted(GPU.glob("*.yaml"))
# anchor spec -> (backbone, published accuracy, source commit named in the header, the source's recipe:
# batch size, epochs, LR schedule, Nesterov, backbone options beyond the defaults)
KUANGLIU = (128, 350, "step", False, {})
ANCHORS = {"anchor_resnet18_cifar10.yaml": ("resnet18", 0.9302, "0ed52b1", KUANGLIU),
           "anchor_vgg16_cifar10.yaml": ("vgg16", 0.9264, "0ed52b1", KUANGLIU),
           "anchor_vgg11_bn_cifar10.yaml": ("vgg11", 0.9279, "d1c8e99", (256, 200, "cosine", True,
                                                                         {"head": "mlp", "bias": True}))}


def _header(path: Path) -> str:
    """The spec's leading comment as one line of text (comment markers dropped, lines joined by a space)."""
    lines = path.read_text().splitlines()
    head = lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))]
    return " ".join(line.lstrip("#").strip() for line in head)


# ---------------------------------------------------------------- the ResNet-18 CIFAR stem
def test_resnet18_cifar_stem_is_kuangliu_resnet18():
    model = nb.models.create("resnet18", norm="bn", stem="cifar")
    # kuangliu/pytorch-cifar's ResNet18() with 10 classes: 11,173,962 parameters (their 3x3 stem has no bias)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, torch.nn.Identity)
    sizes = {}
    for name in ("layer1", "layer4"):  # a hook that returns None leaves the output alone
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.update({name: tuple(o.shape[-2:])}))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sizes == {"layer1": (32, 32), "layer4": (4, 4)}  # theirs: 32x32 after the stem, 4x4 before the pool
    imagenet = nb.models.create("resnet18", norm="bn")  # the default stays timm's 7x7/2 + max-pool
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, torch.nn.MaxPool2d)
    assert sum(p.numel() for p in imagenet.parameters()) == 11_173_962 - 3 * 64 * 9 + 3 * 64 * 49


def test_vgg11_mlp_head_is_the_published_cifar_vgg11_bn():
    """chenyaofo/pytorch-cifar-models' cifar10_vgg11_bn (torchvision's VGG, configuration A, with BN): conv (with
    bias) -> BN -> ReLU x 8 and torchvision's classifier 512-512-10 with dropout; 9.76M parameters, counted here
    from that layer list, not from our code."""
    torch.manual_seed(0)
    model = nb.models.create("vgg11", norm="bn", head="mlp", bias=True)
    channels = [64, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(9 * cin * cout + cout + 2 * cout for cin, cout in zip([3, *channels], channels))  # conv + bias + BN
    head = (512 * 512 + 512) * 2 + 512 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == convs + head == 9_756_426
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 10)]
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.head.modules()) == 2
    for m in linears:  # torchvision's VGG init: N(0, 0.01), zero bias
        assert abs(float(m.weight.detach().std()) - 0.01) < 0.002 and float(m.bias.detach().abs().max()) == 0.0
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))  # dropout is off in eval mode
    model.train()
    assert not torch.equal(model.head(torch.ones(4, 512)), model.head(torch.ones(4, 512)))  # and on in training
    with pytest.raises(ConfigError, match=r"head='conv' is not allowed; valid: linear, mlp"):
        nb.models.create("vgg11", norm="bn", head="conv")
    assert isinstance(nb.models.create("vgg11", norm="bn").head, torch.nn.Linear)  # the default is unchanged


@pytest.mark.parametrize("norm", nb.norms.available())
def test_resnet18_cifar_stem_builds_with_every_norm(norm):
    torch.manual_seed(0)
    model = nb.models.create("resnet18", norm=norm, stem="cifar")
    y = model(torch.randn(2, 3, 16, 16))  # 16x16 keeps it fast; 32x32 is the test above
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    # the stem's norm is the chosen one (a real identity for none), not timm's BatchNorm2d
    assert type(model.bn1) is type(nb.norms.create(norm, 64, layout="image"))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_resnet18_bad_stem_is_a_config_error():
    assert load_config(None, ["model.backbone=resnet18", "model.stem=cifar"]).model.options == {"stem": "cifar"}
    with pytest.raises(ConfigError, match=r"stem='cifar10' is not allowed; valid: imagenet, cifar"):
        load_config(None, ["model.backbone=resnet18", "model.stem=cifar10"])
    with pytest.raises(ConfigError, match=r"stem"):  # resnet20 is already a CIFAR net: no such option
        load_config(None, ["model.backbone=resnet20", "model.stem=cifar"])


# ---------------------------------------------------------------- the specs
@pytest.mark.parametrize("name", sorted(ANCHORS))
def test_anchor_spec_is_the_published_recipe(name):
    backbone, published, commit, (batch, epochs, schedule, nesterov, options) = ANCHORS[name]
    spec = load_spec(GPU / name)
    points = spec.points()
    assert len(points) == 3 and sorted(p.values["seed"] for p in points) == [0, 1, 2]
    cfg = spec.trial_config(points[0])
    assert cfg.model.backbone == backbone and cfg.model.norm == "bn"
    assert cfg.model.options.get("stem", "cifar") == "cifar"
    assert {k: v for k, v in cfg.model.options.items() if k not in ("stem", "norm_position")} == options
    assert cfg.model.options.get("norm_position", "before_act") == "before_act"
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.warmup_steps, o.nesterov) == ("sgd", 0.1, 0.9, 5e-4, 0,
                                                                                      nesterov)
    assert (cfg.data.batch_size, cfg.data.augment, cfg.trainer.max_epochs) == (batch, True, epochs)
    assert o.schedule == schedule
    if schedule == "step":  # x0.1 at epochs 150 and 250 of 350: within one step of those epochs' first steps
        steps = epochs_to_steps(350, 49_000, 128)
        assert o.gamma == 0.1
        assert [round(m * steps) for m in o.milestones] == pytest.approx(
            [epochs_to_steps(150, 49_000, 128), epochs_to_steps(250, 49_000, 128)], abs=1)
    else:  # cosine annealing to 0 over the whole run, as CosineAnnealingLR(T_max = the epochs, eta_min 0)
        assert o.min_lr_ratio == 0.0
    assert cfg.optim.grad_clip is None and cfg.trainer.accelerator == "gpu"
    header = _header(GPU / name)
    assert f"{published * 100:.2f}" in header and commit in header  # the number and where it comes from
    lo, hi = f"{published - 0.005:.4f}", f"{published + 0.005:.4f}"
    assert f"[{lo}, {hi}]" in header  # the pre-registered criterion, stated as numbers


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_gpu_spec_header_has_purpose_cost_and_command(path):
    header = _header(path)
    assert len(header) > 200  # a purpose, not a title
    assert len(re.findall(r"total ~[\d.]+ GPU-hours", header)) == 1, "one estimated total cost in GPU-hours"
    assert f"normablate sweep --config configs/studies/gpu/{path.name}" in header
    readme = (GPU / "README.md").read_text()
    assert f"`{path.name}`" in readme  # listed, with its cost, in the folder's README


def test_readme_costs_match_spec_headers():
    """The folder README's cost column is each spec's own total ("total ~X GPU-hours" in its header), so the two
    cannot drift apart."""
    rows = dict(re.findall(r"^\| `([\w.]+\.yaml)` \|.*\| ~([\d.]+) \|$", (GPU / "README.md").read_text(), re.M))
    assert set(rows) == {p.name for p in SPECS}
    for p in SPECS:
        assert [rows[p.name]] == re.findall(r"total ~([\d.]+) GPU-hours", _header(p)), p.name


def test_gpu_specs_check_without_network_or_data(monkeypatch, capsys):
    """--check builds and validates every trial config, never reads the data: the WikiText-103 spec (a hub source)
    passes with every socket connection refused and the hub set offline."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("NORMABLATE_CACHE", "/nonexistent/normablate-cache")
    monkeypatch.chdir(ROOT)
    spec = GPU / "lm_wikitext103.yaml"
    assert main(["sweep", "--config", str(spec), "--check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "54 trials; 54 run configs valid; 5 pre-registered hypotheses valid" in out
    cfg = load_spec(spec).trial_config(load_spec(spec).points()[0])
    assert (cfg.data.source, cfg.data.hub_config) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    model = nb.models.create("transformer_lm", norm="ln", **{**cfg.model.options, "block_size": cfg.data.block_size})
    assert sum(p.numel() for p in model.parameters()) >= 10_000_000


def test_wikitext_spec_data_keys_train_on_a_local_copy(tmp_path):
    """The WikiText-103 spec's data settings (its own train / validation / test splits, column text, one padded
    paragraph per sample) train end to end on a save_to_disk copy shaped like the hub's (rows of paragraphs, empty
    rows and headings between them), as its header tells a machine without the hub to do. Tiny model, 2 CPU steps."""
    import datasets

    from normablate.config import from_dict
    from normablate.train import train

    paragraph = " The game was released in 2011 . It received generally positive reviews from critics . \n"
    rows = ["", " = Valkyria Chronicles = \n", "", paragraph * 3, "", paragraph, " = = Gameplay = = \n", paragraph * 2]
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": rows * n}) for s, n in
                          (("train", 20), ("validation", 3), ("test", 3))}).save_to_disk(str(tmp_path / "wikitext"))
    spec = load_spec(GPU / "lm_wikitext103.yaml")
    d = spec.trial_dict(spec.points()[0], run="smoke")
    d["data"].update(source=str(tmp_path / "wikitext"), hub_config=None, block_size=64, batch_size=4,
                     val_batch_size=4, cache_dir=str(tmp_path / "cache"))
    d["model"].update(n_layer=1, n_embd=16, n_head=2, norm="masked_bn")
    d["trainer"].update(max_steps=2, val_every=2, val_batches=1, accelerator="cpu", log_dir=str(tmp_path / "logs"),
                        progress=False, loggers=[])
    d["optim"]["warmup_steps"] = 1
    res = train(from_dict(d))
    assert res.status == "completed" and res.steps == 2
    assert torch.isfinite(torch.tensor(res.test["test/ppl"])) and res.test["test/ppl"] > 1
