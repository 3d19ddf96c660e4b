"""ResNets: CIFAR ResNet-20/56 (He et al. 2016, Sec. 4.2) and timm's ResNet-18 with our norm injected."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from ._common import NORM_POSITIONS, ConvNormAct, check_choice, conv_bias, init_cnn


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut.

    ``before_act``: relu(n1(c1 x)) -> n2(c2 .) -> relu(. + shortcut)   (He et al.)
    ``after_act``:  n1(relu(c1 x)) -> c2 . -> n2(relu(. + shortcut))   (each norm follows the ReLU that
    follows its conv; for the second conv that ReLU comes after the addition)
    Shortcut "A": parameter-free (subsample + zero-pad channels, He et al.'s CIFAR choice); "B": 1x1 conv + norm.
    """

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: Callable, norm_position: str,
                 shortcut: str, bias: bool) -> None:
        super().__init__()
        self.after_act = norm_position == "after_act"
        self.c1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.n1 = norm_layer(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.n2 = norm_layer(cout)
        self.pad = 0
        self.stride = stride
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.pad = cout - cin
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), norm_layer(cout))

    def _short(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.after_act:
            out = self.n1(F.relu(self.c1(x)))
            return self.n2(F.relu(self.c2(out) + self._short(x)))
        out = F.relu(self.n1(self.c1(x)))
        return F.relu(self.n2(self.c2(out)) + self._short(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, norm_layer: Callable, num_classes: int = 10, width: int = 16,
                 in_chans: int = 3, norm_position: str = "before_act", shortcut: str = "A",
                 bias: bool | None = None) -> None:
        super().__init__()
        check_choice("norm_position", norm_position, NORM_POSITIONS)
        check_choice("shortcut", shortcut, ("A", "B"))
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        bias = conv_bias(norm_layer, bias, width, norm_position)
        self.stem = ConvNormAct(in_chans, width, norm_layer, norm_position, bias=bias)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, norm_layer, norm_position, shortcut, bias))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, classes)
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


@register("resnet20", layout="image", task="classification")
def resnet20(norm_layer, num_classes: int = 10, width: int = 16, in_chans: int = 3,
             norm_position: str = "before_act", shortcut: str = "A", bias: bool | None = None) -> nn.Module:
    return CifarResNet(20, norm_layer, num_classes, width, in_chans, norm_position, shortcut, bias)


@register("resnet56", layout="image", task="classification")
def resnet56(norm_layer, num_classes: int = 10, width: int = 16, in_chans: int = 3,
             norm_position: str = "before_act", shortcut: str = "A", bias: bool | None = None) -> nn.Module:
    return CifarResNet(56, norm_layer, num_classes, width, in_chans, norm_position, shortcut, bias)


RESNET18_STEMS = ("imagenet", "cifar")


@register("resnet18", layout="image", task="classification")
def resnet18(norm_layer, num_classes: int = 10, in_chans: int = 3, stem: str = "imagenet") -> nn.Module:
    """timm's ResNet-18, our norm in every site via ``norm_layer``.

    ``stem``: ``imagenet`` (timm's: 7x7 stride-2 conv + 3x3 stride-2 max-pool, a 32x32 image reaches the first
    stage at 8x8) or ``cifar`` (the CIFAR variant of github.com/kuangliu/pytorch-cifar, whose ResNet18 reports
    93.02% on CIFAR-10: one 3x3 stride-1 conv, no max-pool, the first stage at 32x32; 11,173,962 parameters with
    10 classes, theirs exactly). The cifar stem replaces timm's ``conv1`` (He init, fan_out, as timm's) and its
    ``maxpool`` by an identity; its norm ``bn1`` and every block stay timm's."""
    import timm  # lazy: timm imports torchvision, seconds of start-up for every other command

    check_choice("stem", stem, RESNET18_STEMS)
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              norm_layer=norm_layer)
    if stem == "cifar":
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, 3, stride=1, padding=1, bias=False,
                                device=old.weight.device)
        if not model.conv1.weight.is_meta:
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model
