"""LayerNorm (``ln``): tokens over C per token (= ``nn.LayerNorm``); images over C at each pixel
(= timm ``LayerNorm2d``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register


@register("ln")
class LayerNorm(nn.LayerNorm):
    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-5, affine: bool = True,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine, bias=bias and affine)
        self.layout = layout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        if self.layout == "image":
            x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
