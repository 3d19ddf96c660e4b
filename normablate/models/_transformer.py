"""Pieces shared by the Transformer backbones (LM and ViT): norm placements, the per-head QK norm, and norm
specs given as backbone options.

Placements of the norm around each residual sub-layer F (attention, FFN):
- ``pre``  (GPT-2, ViT):                 x + F(N(x)), plus a final norm after the last block
- ``post`` (the original Transformer):   N(x + F(x)), no final norm (the stream already ends on a norm)
- ``peri`` (Peri-LN, Kim et al. 2025):   x + N_out(F(N_in(x))), plus the final norm; two norms per sub-layer
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import norms

PLACEMENTS = ("pre", "post", "peri")


def norm_option(key: str, spec: Any):
    """The layer factory of a norm spec given as a backbone option (``qk_norm``, ``attn_norm``, ``ffn_norm``);
    null, false or "" -> None. A bad spec (name, option, or a value that fails when the layer is built) is a
    ConfigError that names the option."""
    if spec is None or spec is False or spec == "":
        return None
    return norms.resolve(spec, "tokens", where=f"model.{key}={spec!r}")


class HeadNorm(nn.Module):
    """Apply a tokens-layout norm over ``head_dim`` to queries or keys of shape ``(B, h, T, d)``.

    The norm sees ``(B, h*T, d)`` - every (head, token) pair is a token of width d - and the padding mask
    repeated for each head, so a mask-aware norm (masked BN, PowerNorm) takes statistics over real tokens only
    and per-token norms (LN, RMS) normalize each head's vector separately. One norm (one set of d gains) is
    shared by all heads, as in timm's ``Attention(qk_norm=True)``. Not itself a norm site: the wrapped module is.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, h, T, d = x.shape
        x = x.reshape(B, h * T, d)
        if mask is None:  # (a plain callable such as nn.LayerNorm takes no mask)
            return self.norm(x).view(B, h, T, d)
        mask = mask[:, None, :].expand(B, h, T).reshape(B, h * T)  # (B, T) -> (B, h*T)
        return self.norm(x, mask=mask).view(B, h, T, d)
