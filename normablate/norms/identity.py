"""No normalization (``none``): a true identity with no parameters and no buffers."""
from __future__ import annotations

import torch
from torch import nn

from . import register


@register("none")
class Identity(nn.Module):
    def __init__(self, num_features: int = 0, layout: str = "image") -> None:  # noqa: ARG002
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        return x
