"""The Transformer backbones' fast paths (issue 29) against the code they replace: the same parameters and
initialisation, and the same outputs and gradients, bit for bit (each path only changes which views or which
mask tensor reach the same kernels).

- ViT: ``models/_vit_block.Attention`` (q, k, v as views of the fused projection's column blocks) vs timm's
  ``Attention.forward`` (reshape/permute/unbind), on the same module.
- LM: the additive float mask built once per forward (``models/lm.additive_mask``) vs the boolean mask that SDPA
  converted in every layer.
"""
from __future__ import annotations

import copy

import pytest
import torch

from normablate import models

pytest.importorskip("timm")
from timm.models.vision_transformer import Attention as TimmAttention  # noqa: E402

from normablate.models import _vit_block, lm  # noqa: E402


def _run(m: torch.nn.Module, *inputs, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter's gradient under a non-uniform upstream gradient."""
    m.zero_grad(set_to_none=True)
    y = m(*inputs, **kwargs)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same(new, old) -> None:
    (y_new, g_new), (y_old, g_old) = new, old
    assert torch.equal(y_new, y_old), (y_new - y_old).abs().max()
    assert g_new.keys() == g_old.keys() and g_new
    for name in g_new:
        assert torch.equal(g_new[name], g_old[name]), (name, (g_new[name] - g_old[name]).abs().max())


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    norm = kwargs.pop("norm", "ln")
    return models.create("vit", norm=norm, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                         img_size=16, patch_size=4, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"norm_placement": "post"}, {"norm_placement": "peri"}, {"qk_norm": "ln"},
                                    {"norm": "bn", "ffn_norm": "bn"}, {"norm": "dyt"}])
def test_vit_attention_matches_timm(kwargs, monkeypatch):
    m = _vit(**kwargs).train()
    assert all(type(b.attn) is _vit_block.Attention for b in m.blocks)
    old = copy.deepcopy(m)  # (BN's running statistics move with each training forward)
    x = torch.randn(4, 3, 16, 16)
    new_out = _run(m, x)
    monkeypatch.setattr(_vit_block.Attention, "forward", TimmAttention.forward)
    _assert_same(new_out, _run(old, x))


@pytest.mark.parametrize("mode", ["plain", "causal", "bool_mask", "float_mask"])
def test_vit_attention_module_masks(mode):
    torch.manual_seed(0)
    attn = _vit_block.Attention(32, num_heads=4, qkv_bias=True).train()
    x = torch.randn(3, 7, 32)
    allowed = (torch.rand(3, 1, 7, 7) > 0.4) | torch.eye(7, dtype=torch.bool)
    kwargs = {"plain": {}, "causal": {"is_causal": True}, "bool_mask": {"attn_mask": allowed},
              "float_mask": {"attn_mask": torch.randn(3, 1, 7, 7)}}[mode]
    new = _run(attn, x, **kwargs)
    old = copy.deepcopy(attn)
    old.forward = lambda *a, **k: TimmAttention.forward(old, *a, **k)  # timm's forward on the same weights
    _assert_same(new, _run(old, x, **kwargs))


def test_vit_attention_falls_back_to_timm_where_not_covered():
    """timm's non-fused attention (fused_attn off) runs timm's own forward: the same function as the fused one."""
    torch.manual_seed(0)
    attn = _vit_block.Attention(32, num_heads=2).eval()
    x = torch.randn(2, 5, 32)
    fused = attn(x)
    attn.fused_attn = False
    assert torch.equal(attn(x), TimmAttention.forward(attn, x))
    torch.testing.assert_close(attn(x), fused, rtol=1e-5, atol=1e-6)


def test_vit_parameters_and_init_unchanged(monkeypatch):
    """Same state_dict keys and the same initial values, bit for bit, as with timm's Attention: old checkpoints load
    strictly (no key renamed, no conversion hook needed) and the init distribution is untouched."""
    new = _vit(qk_norm="ln")
    monkeypatch.setattr(_vit_block, "Attention", TimmAttention)
    old = _vit(qk_norm="ln")
    assert type(old.blocks[0].attn) is TimmAttention and type(new.blocks[0].attn) is not TimmAttention
    sd_new, sd_old = new.state_dict(), old.state_dict()
    assert list(sd_new) == list(sd_old)
    for key in sd_new:
        assert torch.equal(sd_new[key], sd_old[key]), key
    fresh = _vit(qk_norm="ln")
    fresh.load_state_dict(sd_old)  # strict


def _lm(norm: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("transformer_lm", norm=norm, n_layer=2, n_embd=32, n_head=4, block_size=16, **kwargs)


LM_CASES = [("ln", {}), ("masked_bn", {}), ("ln", {"qk_norm": "rms"}), ("masked_bn", {"norm_placement": "post"}),
            ("powernorm", {"norm_placement": "peri"}), ("bn", {})]


@pytest.mark.parametrize(("norm", "kwargs"), LM_CASES)
def test_lm_additive_mask_matches_boolean(norm, kwargs, monkeypatch):
    m = _lm(norm, **kwargs).train()
    old = copy.deepcopy(m)  # (running statistics move with each training forward)
    idx = torch.randint(0, 256, (4, 16))
    mask = torch.arange(16)[None] < torch.tensor([[16], [9], [3], [12]])
    new_out = _run(m, idx, mask=mask)
    monkeypatch.setattr(lm, "additive_mask", lambda allowed, dtype: allowed)  # the boolean mask, as before
    _assert_same(new_out, _run(old, idx, mask=mask))


def test_lm_additive_mask_under_bf16_autocast(monkeypatch):
    m = _lm("ln").train()
    old = copy.deepcopy(m)
    idx = torch.randint(0, 256, (3, 16))
    mask = torch.arange(16)[None] < torch.tensor([[16], [5], [11]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new_out = _run(m, idx, mask=mask)
        monkeypatch.setattr(lm, "additive_mask", lambda allowed, dtype: allowed)
        old_out = _run(old, idx, mask=mask)
    _assert_same(new_out, old_out)


def test_additive_mask_values():
    allowed = torch.tensor([[True, False], [False, False]])
    out = lm.additive_mask(allowed, torch.float32)
    assert torch.equal(out, torch.tensor([[0.0, float("-inf")], [float("-inf"), float("-inf")]]))
    assert lm.additive_mask(allowed, torch.bfloat16).dtype == torch.bfloat16


def test_vit_attention_traces_with_torch_fx():
    """normablate.fold finds BN -> Linear pairs on the torch.fx graph: the attention traces as timm's does."""
    from normablate.fold import fold_norms

    torch.fx.symbolic_trace(_vit_block.Attention(32, num_heads=2))
    _, report = fold_norms(_vit(norm="bn").eval())
    assert report.traced and report.folded
