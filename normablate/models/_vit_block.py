"""The ViT block (models/vit.py): timm's ``Block`` plus post/peri placements and an optional QK norm.

In its own module so that timm (which imports torchvision) is imported only when a ViT is built, not when the
CLI starts (``normablate list``/``--help``, issue 11).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block as TimmBlock

from ._transformer import HeadNorm


class Block(TimmBlock):
    """timm's pre-norm block, plus post (``norm1(x + attn(x))``) and peri (``x + norm1_out(attn(norm1(x)))``)
    placements and an optional QK norm (our norm, wrapped per head, in place of timm's q_norm/k_norm)."""

    def __init__(self, *, placement: str = "pre", qk_norm_layer=None, **timm_kwargs: Any) -> None:
        super().__init__(**timm_kwargs)
        self.placement = placement
        if placement == "peri":
            dim, norm_layer = timm_kwargs["dim"], timm_kwargs["norm_layer"]
            self.norm1_out, self.norm2_out = norm_layer(dim), norm_layer(dim)
        if qk_norm_layer is not None:
            self.attn.q_norm = HeadNorm(qk_norm_layer(self.attn.head_dim))  # q, k: (B, h, N, head_dim)
            self.attn.k_norm = HeadNorm(qk_norm_layer(self.attn.head_dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.placement == "pre":
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.placement == "peri":
            a = self.norm1_out(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
            x = x + self.drop_path1(self.ls1(a))
            return x + self.drop_path2(self.ls2(self.norm2_out(self.mlp(self.norm2(x)))))
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))))
        return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
