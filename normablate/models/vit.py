"""Vision Transformer for 32x32 inputs: timm's ``VisionTransformer`` with our norm in every norm site
(each block's norm1/norm2 and the final norm) and an optional norm between the two FFN linear layers
(BN-in-FFN, Yao et al. 2021). ``norm_placement`` (pre | post | peri, models/_transformer.py) and ``qk_norm``
(any norm spec, per head over head_dim) come from our ``Block``, a subclass of timm's ``Block``: with the
defaults (pre, no QK norm) it is timm's block, same modules, same names, same computation (its attention is
``_vit_block.Attention``: timm's, with q, k, v split as views that make the backward one pass cheaper; bitwise the
same outputs and gradients, the same state_dict).

timm pitfalls handled here: ``VisionTransformer`` replaces a falsy ``norm_layer`` by LayerNorm (we always pass
a callable, ``none`` included), and ``Block`` passes ``norm_layer=None`` to its MLP, overriding any
``partial(Mlp, norm_layer=...)``; so the FFN is our own module that takes its norm under another name.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from . import register
from ._common import check_choice
from ._transformer import PLACEMENTS, norm_option

FFN_NORM_POSITIONS = ("before_act", "after_act")


class FFN(nn.Module):
    """fc1 -> [norm] -> GELU -> [norm] -> fc2; the norm (if any) sits at ``position`` relative to the GELU."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, ffn_norm_layer=None,
                 position: str = "before_act", bias: bool = True, drop: float = 0.0,
                 **_timm_kwargs: Any) -> None:  # Block's norm_layer=None, device, dtype: ignored on purpose
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.norm = ffn_norm_layer(hidden_features) if ffn_norm_layer is not None else None
        self.before_act = position == "before_act"
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, C) -> (N, T, C)
        x = self.fc1(x)
        if self.norm is not None and self.before_act:
            x = self.norm(x)
        x = self.act(x)
        if self.norm is not None and not self.before_act:
            x = self.norm(x)
        return self.drop(self.fc2(self.drop(x)))


@register("vit", layout="tokens", task="classification", inputs={"img_size": "image_size"})
def vit(norm_layer, num_classes: int = 10, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
        embed_dim: int = 192, depth: int = 6, num_heads: int = 3, mlp_ratio: float = 2.0,
        ffn_norm: Any = None, ffn_norm_position: str = "before_act", drop_path_rate: float = 0.0,
        global_pool: str = "token", norm_placement: str = "pre", qk_norm: Any = None) -> nn.Module:
    """A tiny ViT (default 6 blocks of width 192, 64 patches of 4x4 + a class token).

    ``ffn_norm``: ``None`` (no FFN norm), ``True`` (the same norm as everywhere else), or a norm spec (name or
    ``{"name": ..., **options}``) for the norm inserted between fc1 and fc2. ``norm_placement``: pre | post |
    peri; post has no final norm (the last block ends on one). ``qk_norm``: null or a norm spec, applied to
    queries and keys per head over head_dim before the dot product.
    """
    check_choice("ffn_norm_position", ffn_norm_position, FFN_NORM_POSITIONS)
    check_choice("global_pool", global_pool, ("token", "avg"))
    check_choice("norm_placement", norm_placement, PLACEMENTS)
    qk_norm_layer = norm_option("qk_norm", qk_norm)
    ffn_norm_layer = norm_layer if ffn_norm is True else norm_option("ffn_norm", ffn_norm)
    from timm.models.vision_transformer import VisionTransformer  # lazy: timm imports torchvision (start-up)

    from ._vit_block import Block

    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        global_pool=global_pool, class_token=True, drop_path_rate=drop_path_rate,
        norm_layer=norm_layer, mlp_layer=partial(FFN, ffn_norm_layer=ffn_norm_layer, position=ffn_norm_position),
        block_fn=partial(Block, placement=norm_placement, qk_norm_layer=qk_norm_layer),
        final_norm=norm_placement != "post",
        # built on the meta device by a config check: timm's random init is pure cost there (seconds per model)
        weight_init="skip" if torch.get_default_device().type == "meta" else "",
    )
    return model


def __getattr__(name: str) -> Any:  # ``Block`` lives in _vit_block.py, imported on first use (timm is slow)
    if name == "Block":
        from ._vit_block import Block
        return Block
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
