"""VGG-style plain CNNs without skip connections (Simonyan & Zisserman 2015; CIFAR variant as in Santurkar
et al. 2018): 3x3 convs, each followed by the norm and a ReLU, max-pools, and a classifier: one linear layer
(``head: linear``, the default) or torchvision's VGG classifier (``head: mlp``: two hidden linear layers of 512
channels, each followed by ReLU and dropout 0.5, weights N(0, 0.01) as torchvision initializes them), the head of
the published CIFAR VGG-11-BN the GPU anchor reproduces (configs/studies/gpu/anchor_vgg11_bn_cifar10.yaml)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import register
from ._common import NORM_POSITIONS, ConvNormAct, check_choice, conv_bias, init_cnn

HEADS = ("linear", "mlp")
CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list, norm_layer: Callable, num_classes: int = 10, width: float = 1.0,
                 in_chans: int = 3, norm_position: str = "before_act", bias: bool | None = None,
                 head: str = "linear", dropout: float = 0.5) -> None:
        super().__init__()
        check_choice("norm_position", norm_position, NORM_POSITIONS)
        check_choice("head", head, HEADS)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
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
        if head == "linear":
            self.head = nn.Linear(cin, num_classes)
        else:
            hidden = max(1, int(round(512 * width)))
            self.head = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(hidden, num_classes))
        init_cnn(self)
        if head == "mlp" and not any(p.is_meta for p in self.head.parameters()):
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, classes)
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))  # 1x1 after five pools on 32x32; mean keeps other sizes working


def _vgg(name: str):
    @register(name, layout="image", task="classification")
    def build(norm_layer, num_classes: int = 10, width: float = 1.0, in_chans: int = 3,
              norm_position: str = "before_act", bias: bool | None = None, head: str = "linear",
              dropout: float = 0.5) -> nn.Module:
        return VGG(CFGS[name], norm_layer, num_classes, width, in_chans, norm_position, bias, head, dropout)

    build.__name__ = name
    return build


vgg11 = _vgg("vgg11")
vgg16 = _vgg("vgg16")
