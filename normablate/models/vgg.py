"""VGG-style plain CNNs without skip connections (Simonyan & Zisserman 2015; CIFAR variant as in Santurkar
et al. 2018): 3x3 convs, each followed by the norm and a ReLU, max-pools, one linear classifier."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import register
from ._common import NORM_POSITIONS, ConvNormAct, check_choice, conv_bias, init_cnn

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list, norm_layer: Callable, num_classes: int = 10, width: float = 1.0,
                 in_chans: int = 3, norm_position: str = "before_act", bias: bool | None = None) -> None:
        super().__init__()
        check_choice("norm_position", norm_position, NORM_POSITIONS)
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        first = next(v for v in cfg if v != "M")
        bias = conv_bias(norm_layer, bias, max(1, int(round(first * width))), norm_position)
        layers: list[nn.Module] = []
        cin = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, int(round(v * width)))
                layers.append(ConvNormAct(cin, cout, norm_layer, norm_position, bias=bias))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, classes)
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))  # 1x1 after five pools on 32x32; mean keeps other sizes working


def _vgg(name: str):
    @register(name, layout="image", task="classification")
    def build(norm_layer, num_classes: int = 10, width: float = 1.0, in_chans: int = 3,
              norm_position: str = "before_act", bias: bool | None = None) -> nn.Module:
        return VGG(CFGS[name], norm_layer, num_classes, width, in_chans, norm_position, bias)

    build.__name__ = name
    return build


vgg11 = _vgg("vgg11")
vgg16 = _vgg("vgg16")
