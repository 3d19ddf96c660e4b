"""GroupNorm (``gn``): ``nn.GroupNorm``; for tokens, over channel groups of each token separately."""
from __future__ import annotations

import torch
from torch import nn

from . import register


def default_groups(num_features: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """The largest divisor of ``num_features`` that is at most ``max_groups`` (32, Wu & He 2018) and leaves at
    least ``min_group_size`` channels per group (so narrow layers do not silently become InstanceNorm)."""
    limit = max(1, min(max_groups, num_features // min_group_size))
    return max(g for g in range(1, limit + 1) if num_features % g == 0)


@register("gn")
class GroupNorm(nn.GroupNorm):
    def __init__(self, num_features: int, layout: str = "image", num_groups: int | None = None,
                 eps: float = 1e-5, affine: bool = True) -> None:
        groups = default_groups(num_features) if num_groups is None else num_groups
        if groups < 1 or num_features % groups:
            raise ValueError(f"gn: num_groups={groups} must be >= 1 and divide num_features={num_features}")
        super().__init__(groups, num_features, eps=eps, affine=affine)
        self.layout = layout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        if self.layout == "image":
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)  # (N*T, C): groups per token
