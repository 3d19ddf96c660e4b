"""A GPT-style causal decoder (nanoGPT's shape) whose norms and attention honour a padding mask.

``forward(idx, mask=None)``: ``idx`` (B, T) int tokens; ``mask`` (B, T) bool, True for real tokens of
right-padded sequences. The mask reaches every norm (so masked BatchNorm ignores padding) and the attention
(padded keys are never attended to). Tied input/output embeddings; byte vocabulary (256) by default.
Written by hand rather than taken from timm/HF because the mask has to reach every norm.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from ..errors import ConfigError
from ._common import check_choice
from ._transformer import PLACEMENTS, HeadNorm, norm_option


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as SDPA's additive float mask: 0 where allowed, -inf elsewhere.

    SDPA turns a boolean mask into exactly this tensor on every call (``where(mask, 0, -inf)``); built once per
    forward and shared by every layer, the attention is the same bit for bit (tests/models/test_fast_paths.py) and
    the per-layer conversion is gone: 0.87x the attention's forward+backward at the LM studies' size, but within
    noise for their 2-layer step (0.97-1.02x, ``normablate bench --only transformer_steps``). Every row keeps at
    least one 0 (a token always sees itself): no NaN."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention; ``qk_norm_layer`` (optional) normalizes q and k per head over head_dim."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 qk_norm_layer: Callable | None = None) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.q_norm = HeadNorm(qk_norm_layer(n_embd // n_head)) if qk_norm_layer is not None else None
        self.k_norm = HeadNorm(qk_norm_layer(n_embd // n_head)) if qk_norm_layer is not None else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        if self.q_norm is not None:  # the padding mask reaches the QK norms too
            q, k = self.q_norm(q, mask=mask), self.k_norm(k, mask=mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """pre: x + attn(n1(x)), x + mlp(n2(x));  post (original Transformer): n1(x + attn(x)), n2(x + mlp(x));
    peri (Peri-LN): x + n1_out(attn(n1(x))), x + n2_out(mlp(n2(x))). n1 and n1_out (the attention branch's
    norms) are ``attn_norm_layer`` when given, else ``norm_layer`` like n2 and n2_out."""

    def __init__(self, n_embd: int, n_head: int, norm_layer: Callable, dropout: float, bias: bool,
                 placement: str, qk_norm_layer: Callable | None = None,
                 attn_norm_layer: Callable | None = None) -> None:
        super().__init__()
        self.placement = placement
        attn_norm_layer = attn_norm_layer or norm_layer
        self.n1 = attn_norm_layer(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, qk_norm_layer)
        self.n2 = norm_layer(n_embd)
        self.mlp = MLP(n_embd, dropout, bias)
        self.drop = nn.Dropout(dropout)
        if placement == "peri":
            self.n1_out, self.n2_out = attn_norm_layer(n_embd), norm_layer(n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.drop(self.attn(self.n1(x, mask=mask), attn_mask, mask))
            return x + self.mlp(self.n2(x, mask=mask))
        if self.placement == "peri":
            x = x + self.drop(self.n1_out(self.attn(self.n1(x, mask=mask), attn_mask, mask), mask=mask))
            return x + self.n2_out(self.mlp(self.n2(x, mask=mask)), mask=mask)
        x = self.n1(x + self.drop(self.attn(x, attn_mask, mask)), mask=mask)
        return self.n2(x + self.mlp(x), mask=mask)


class TransformerLM(nn.Module):
    def __init__(self, norm_layer: Callable, vocab_size: int = 256, block_size: int = 256, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, bias: bool = True,
                 norm_placement: str = "pre", qk_norm_layer: Callable | None = None,
                 embed_scale: float | None = None, attn_norm_layer: Callable | None = None) -> None:
        super().__init__()
        check_choice("norm_placement", norm_placement, PLACEMENTS)
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        # learnable scalar on the summed embeddings (None: no scalar, GPT-2's plain sum)
        self.embed_scale = None if embed_scale is None else nn.Parameter(torch.full((1,), float(embed_scale)))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, norm_layer, dropout, bias, norm_placement, qk_norm_layer,
                                          attn_norm_layer) for _ in range(n_layer))
        self.norm_f = norm_layer(n_embd) if norm_placement != "post" else None  # post-norm already ends on a norm
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        if self.head.weight.is_meta:  # built by a config check: no init (see models/_common.init_cnn)
            return
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        attn_mask = None
        if mask is not None:
            mask = mask.bool()
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            # Keys must be real; a padded query may also see itself so its row is never empty (no NaN).
            keys = mask[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=idx.device)
            attn_mask = additive_mask(causal & keys, self.tok.weight.dtype)  # (B, 1, T, T), 0 = may attend
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, C)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask, attn_mask)
        if self.norm_f is not None:
            x = self.norm_f(x, mask=mask)
        return self.head(x)  # (B, T, vocab)


@register("transformer_lm", layout="tokens", task="lm")
def transformer_lm(norm_layer, vocab_size: int = 256, block_size: int = 256, n_layer: int = 4, n_head: int = 4,
                   n_embd: int = 128, dropout: float = 0.0, bias: bool = True,
                   norm_placement: str = "pre", qk_norm: Any = None, embed_scale: Any = None,
                   attn_norm: Any = None) -> nn.Module:
    """``norm_placement``: pre | post | peri (models/_transformer.py). ``qk_norm``: null (none) or a norm spec
    (name or ``{name: ..., **options}``, any registered norm) applied to queries and keys per head over
    head_dim before the dot product; it receives the padding mask like every other norm.

    ``attn_norm``: null (default: ``norm`` everywhere) or a norm spec for the attention sub-layer's norms (pre:
    the one before attention; peri: before and after it; post: the one after the attention residual add), while
    ``norm`` stays on the MLP sub-layer and the final norm. The DyT authors' LLaMA recipe needs this: a larger alpha_0 before attention than elsewhere
    (Zhu et al. 2025, 0.8 / 0.2 at 7B; their code's ``attn_alpha_init_value`` vs ``ffn_`` and
    ``dec_alpha_init_value``), e.g. ``norm: {name: dyt, alpha_init: 0.5}, attn_norm: {name: dyt, alpha_init: 2}``.

    ``embed_scale``: null (default: GPT-2's plain sum of token and position embeddings), ``sqrt_d`` or a number
    > 0: the summed embeddings are multiplied by a learnable scalar initialised to sqrt(n_embd) or that number
    (never weight-decayed: it is 1-D). This is the DyT authors' LLaMA recipe (Zhu et al. 2025; their reference
    code scales the token embeddings by a learnable scalar initialised to sqrt(d)): with GPT-2's 0.02-std
    embeddings a DyT layer, which does not rescale its input, would otherwise pass a signal ~100x smaller than
    LN's unit-variance one. LLaMA has no position embeddings; here the sum is scaled, so positions keep GPT-2's
    weight relative to tokens."""
    return TransformerLM(norm_layer, vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias,
                         norm_placement, norm_option("qk_norm", qk_norm), _embed_scale(embed_scale, n_embd),
                         norm_option("attn_norm", attn_norm))


def _embed_scale(value: Any, n_embd: int) -> float | None:
    if value is None or value is False:
        return None
    if value == "sqrt_d":
        return math.sqrt(n_embd)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise ConfigError(f"embed_scale={value!r} is not allowed; valid: null (no scalar), sqrt_d, or a number > 0")
