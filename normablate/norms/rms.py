"""RMSNorm (``rms``): ``x / sqrt(mean(x^2) + eps) * g`` over channels, eps inside the root as in
``torch.nn.RMSNorm`` (via ``F.rms_norm``). Default eps 1e-6: 1e-8 has produced NaNs in practice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register


@register("rms")
class RMSNorm(nn.RMSNorm):
    def __init__(self, num_features: int, layout: str = "image", eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine)
        self.layout = layout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        if self.layout == "image":
            x = x.permute(0, 2, 3, 1)
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps).permute(0, 3, 1, 2)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
