"""The ViT block (models/vit.py): timm's ``Block`` plus post/peri placements and an optional QK norm.

In its own module so that timm (which imports torchvision) is imported only when a ViT is built, not when the
CLI starts (``normablate list``/``--help``, issue 11).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock

from ._transformer import HeadNorm


class Attention(TimmAttention):
    """timm's ``Attention`` (same modules, names, parameters and initialisation; ``qkv`` is already one fused
    ``Linear(d, 3d)``) with q, k, v taken as views of the projection's three column blocks.

    timm splits with ``reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)``: the backward stacks the three
    gradients into a new (3, B, h, N, d) tensor and copies that back to (B, N, 3hd), two passes over the
    projection's gradient. ``split(hd, dim=2)`` then ``view(B, N, h, d).transpose(1, 2)`` (nanoGPT's split, as in
    models/lm.py) gives the same q, k, v (same strides into the same buffer), so SDPA sees identical inputs and the
    forward and every gradient are bitwise the same (tests/models/test_fast_paths.py); CPU flash attention's
    backward returns gradients laid out (B, N, h, d), so the backward is one concatenation into (B, N, 3hd) and no
    copy: 0.94-0.98x the ViT studies' step (``normablate bench --only transformer_steps``). Anything this path
    does not cover (timm's non-fused attention, a gate, a scale norm) runs timm's own forward."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self.fused_attn or self.gate is not None or not isinstance(self.norm, torch.nn.Identity):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).split(self.attn_dim, dim=2)  # (B, N, h*d) each (unpacked, not looped: fx traces it)
        q, k, v = (q.view(B, N, h, d).transpose(1, 2), k.view(B, N, h, d).transpose(1, 2),
                   v.view(B, N, h, d).transpose(1, 2))  # (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, h*d)
        return self.proj_drop(self.proj(x))


class Block(TimmBlock):
    """timm's pre-norm block (with our ``Attention``, above), plus post (``norm1(x + attn(x))``) and peri
    (``x + norm1_out(attn(norm1(x)))``) placements and an optional QK norm (our norm, wrapped per head, in place of
    timm's q_norm/k_norm)."""

    def __init__(self, *, placement: str = "pre", qk_norm_layer=None, **timm_kwargs: Any) -> None:
        if timm_kwargs.get("attn_layer", TimmAttention) is TimmAttention:  # (VisionTransformer passes timm's)
            timm_kwargs["attn_layer"] = Attention
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
