"""Pieces shared by the CNN backbones."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError

NORM_POSITIONS = ("before_act", "after_act")


def check_choice(option: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{option}={value!r} is not allowed; valid: {', '.join(map(str, allowed))}")


def conv_bias(norm_layer: Callable[[int], nn.Module], bias: bool | None, channels: int, norm_position: str) -> bool:
    """Conv bias: explicit if given; else dropped only where a BatchNorm directly follows the conv (its
    per-channel mean subtraction removes any per-channel bias). LN/RMS/GN do not remove it, and after the
    activation the bias sets the ReLU threshold, so there it stays."""
    if bias is not None:
        return bias
    follows = norm_layer(channels)
    return not (isinstance(follows, nn.modules.batchnorm._BatchNorm) and norm_position == "before_act")


def init_cnn(model: nn.Module) -> None:
    """He init for convs (fan_out, as torchvision), zero linear bias. Nothing to do for a model on the meta device
    (config checks build one; random init there is pure cost: it imported torch._dynamo, ~5 s of a spec check)."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class ConvNormAct(nn.Module):
    """conv -> norm -> ReLU (``before_act``) or conv -> ReLU -> norm (``after_act``)."""

    def __init__(self, cin: int, cout: int, norm_layer: Callable, norm_position: str = "before_act",
                 stride: int = 1, bias: bool = False, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm = norm_layer(cout)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        self.after_act = norm_position == "after_act"

    def forward(self, x):
        x = self.conv(x)
        return self.norm(self.act(x)) if self.after_act else self.act(self.norm(x))
