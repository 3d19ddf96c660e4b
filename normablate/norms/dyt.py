"""Dynamic Tanh (``dyt``): ``gamma * tanh(alpha * x) + beta``, a normalization layer without statistics.

Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization" (CVPR 2025): an element-wise ``tanh`` whose
input scale ``alpha`` is a learnable scalar (initialised to 0.5 by default, the paper's choice for ViTs;
``alpha_init`` sets it), followed by the usual per-channel affine ``gamma``/``beta`` (init 1 and 0). It
computes no mean or variance at all, so it is independent of the batch, of the other tokens and of padding.
``per_channel_alpha: true`` learns one alpha per channel instead of one per layer (an ablation; the paper uses
a scalar). ``bias: false`` drops beta (the authors' LLaMA variant); ``affine: false`` drops gamma and beta.
Layouts: tokens ``(..., C)``: affine over the last dim; image ``(N, C, H, W)``: per-channel over dim 1.

Written by hand: two lines of math that no library ships; checked against the authors' code in
tests/norms/test_norm_families.py (fixture from github.com/jiachenzhu/DyT).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register


@register("dyt")
class DynamicTanh(nn.Module):
    is_normalization = True  # it takes every norm's place, so it counts as a norm site

    def __init__(self, num_features: int, layout: str = "image", alpha_init: float = 0.5,
                 per_channel_alpha: bool = False, affine: bool = True, bias: bool = True) -> None:
        super().__init__()
        alpha_init = float(alpha_init)
        if not (math.isfinite(alpha_init) and alpha_init > 0):
            # alpha = 0 maps every input to beta and sends no gradient to the layers below; a negative alpha
            # is a positive one with gamma negated. Neither is a meaningful starting point.
            raise ValueError(f"dyt: alpha_init must be a finite number > 0, got {alpha_init}")
        self.num_features, self.layout, self.alpha_init = num_features, layout, alpha_init
        self.alpha = nn.Parameter(torch.full((num_features if per_channel_alpha else 1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine and bias else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        # image: (N, C, H, W), channel at dim 1; tokens: (..., C), channel last
        shape = (1, -1, 1, 1) if self.layout == "image" else (-1,)
        alpha = self.alpha.view(shape) if self.alpha.numel() > 1 else self.alpha
        y = torch.tanh(alpha * x)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, layout={self.layout}, alpha_init={self.alpha_init}, "
                f"per_channel_alpha={self.alpha.numel() > 1}, affine={self.weight is not None}, "
                f"bias={self.bias is not None}")
