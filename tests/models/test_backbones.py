"""Every backbone x every norm; norm sites counted; masks honoured by the LM; plug-in norms; bad input."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import normablate as nb
from support.backbones import EXPECTED_SITES, TINY
from support.helpers import lm_padding_pair

def _input(backbone):
    if backbone == "transformer_lm":
        return torch.randint(0, 256, (4, 16))
    return torch.randn(4, 3, 32, 32)


def test_every_backbone_registered():
    assert set(TINY) <= set(nb.models.available())


@pytest.mark.parametrize("norm", nb.norms.available())
@pytest.mark.parametrize("backbone", sorted(TINY))
def test_backbone_x_norm_builds_forward_backward(backbone, norm):
    model = nb.models.create(backbone, norm=norm, **TINY[backbone])
    x = _input(backbone)
    y = model(x)
    expected = (4, 16, 256) if backbone == "transformer_lm" else (4, 10)
    assert y.shape == expected
    assert torch.isfinite(y).all()
    y.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backbone", sorted(TINY))
def test_none_means_no_normalization_module(backbone):
    model = nb.models.create(backbone, norm="none", **TINY[backbone])
    offenders = [n for n, m in model.named_modules() if nb.norms.is_norm(m)
                 or re.search(r"(Batch|Layer|Group|RMS|Instance)Norm", type(m).__name__)]
    assert offenders == []


@pytest.mark.parametrize("backbone", sorted(TINY))
def test_bn_in_every_norm_site(backbone):
    model = nb.models.create(backbone, norm="bn", **TINY[backbone])
    found = [m for m in model.modules() if nb.norms.is_norm(m)]
    assert len(found) == EXPECTED_SITES[backbone]
    assert all(type(m) is nb.norms.batch.BatchNorm for m in found)


def test_vit_ffn_norm_adds_a_site_per_block_before_or_after_gelu():
    for position in ("before_act", "after_act"):
        model = nb.models.create("vit", norm="ln", ffn_norm="bn", ffn_norm_position=position, **TINY["vit"])
        ffn_norms = [b.mlp.norm for b in model.blocks]
        assert all(type(n) is nb.norms.batch.BatchNorm for n in ffn_norms)
        assert nb.models.count_norms(model) == EXPECTED_SITES["vit"] + TINY["vit"]["depth"]
        assert model.blocks[0].mlp.before_act == (position == "before_act")
        model(torch.randn(4, 3, 32, 32)).sum().backward()
    # ffn_norm=True reuses the main norm
    model = nb.models.create("vit", norm="rms", ffn_norm=True, **TINY["vit"])
    assert type(model.blocks[1].mlp.norm) is nb.norms.rms.RMSNorm


def test_vit_none_is_not_replaced_by_layernorm():
    model = nb.models.create("vit", norm="none", **TINY["vit"])
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_vit_ffn_norm_position_changes_output():
    torch.manual_seed(0)
    a = nb.models.create("vit", norm="ln", ffn_norm="ln", ffn_norm_position="before_act", **TINY["vit"])
    torch.manual_seed(0)
    b = nb.models.create("vit", norm="ln", ffn_norm="ln", ffn_norm_position="after_act", **TINY["vit"])
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))


def test_cnn_norm_position_orders_layers():
    x = torch.randn(4, 3, 32, 32)
    for backbone in ("vgg11", "resnet20"):
        torch.manual_seed(0)
        before = nb.models.create(backbone, norm="bn", norm_position="before_act", **TINY[backbone])
        torch.manual_seed(0)
        after = nb.models.create(backbone, norm="bn", norm_position="after_act", **TINY[backbone])
        assert not torch.allclose(before(x), after(x))
    # after_act: the norm sees non-negative (post-ReLU) input
    model = nb.models.create("vgg11", norm="bn", norm_position="after_act", **TINY["vgg11"])
    seen = []
    model.features[0].norm.register_forward_hook(lambda m, i, o: seen.append(i[0].min().item()))
    model(x)
    assert seen[0] >= 0


def test_conv_bias_dropped_only_where_bn_directly_follows():
    assert nb.models.create("resnet20", norm="bn").stem.conv.bias is None
    assert nb.models.create("vgg11", norm="masked_bn", width=0.125).features[0].conv.bias is None
    for norm, position in (("none", "before_act"), ("ln", "before_act"), ("rms", "before_act"),
                           ("gn", "before_act"), ("bn", "after_act")):
        model = nb.models.create("resnet20", norm=norm, norm_position=position)
        assert model.stem.conv.bias is not None and model.blocks[0].c1.bias is not None, (norm, position)


def test_vit_avg_pool_final_norm_on_pooled_features():
    for norm in ("bn", "masked_bn", "noisy_bn", "ln"):
        model = nb.models.create("vit", norm=norm, global_pool="avg", **TINY["vit"])
        assert nb.norms.is_norm(model.fc_norm)
        model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_resnet18_is_timm_with_injected_norm():
    model = nb.models.create("resnet18", norm="gn")
    assert type(model).__module__.startswith("timm")
    assert type(model.bn1) is nb.norms.group.GroupNorm


# ---------------------------------------------------------------- language model and padding
@pytest.mark.parametrize("norm", ["masked_bn", "ln", "rms", "none", "gn", "dyt", "powernorm"])
@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
def test_lm_real_token_logits_do_not_depend_on_padding(norm, placement):
    torch.manual_seed(0)
    model = nb.models.create("transformer_lm", norm=norm, norm_placement=placement, **TINY["transformer_lm"])
    model = model.double()
    idx12, mask12, idx16, mask16 = lm_padding_pair()  # the same sequences, padded to 12 vs to 16, other pad ids
    for mode in ("train", "eval"):
        getattr(model, mode)()
        a = model(idx12, mask=mask12)
        b = model(idx16, mask=mask16)[:, :12]
        torch.testing.assert_close(a[mask12], b[mask12], atol=1e-10, rtol=1e-10)
        assert torch.isfinite(b).all()
    # a loss on real tokens sends no gradient to positions that only padding occupies (12..15)
    model.train().zero_grad()
    model(idx16, mask=mask16)[mask16].sum().backward()
    assert model.pos.weight.grad[12:].abs().max() == 0
    assert model.pos.weight.grad[:12].abs().max() > 0


def test_lm_plain_bn_is_polluted_by_padding():
    torch.manual_seed(0)
    model = nb.models.create("transformer_lm", norm="bn", **TINY["transformer_lm"]).double()
    tokens = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    padded = torch.cat([tokens, torch.zeros(2, 6, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)], 1)
    assert not torch.allclose(model(tokens, mask=mask), model(padded, mask=pmask)[:, :10])


def test_lm_padded_keys_never_attended():
    model = nb.models.create("transformer_lm", norm="ln", **TINY["transformer_lm"]).eval()
    captured = {}

    def hook(module, args, kwargs, out):
        captured["mask"] = args[1]

    model.blocks[0].attn.register_forward_hook(hook, with_kwargs=True)
    mask = torch.tensor([[True, True, False, False]])
    model(torch.randint(0, 256, (1, 4)), mask=mask)
    attn = captured["mask"][0, 0] == 0  # SDPA's additive mask (models/lm.additive_mask): 0 = may attend, -inf not
    assert attn[:, 2:].sum() == 2  # pad keys: only the pad queries themselves (the diagonal)
    assert attn[1].tolist() == [True, True, False, False]
    assert not attn[0, 1]  # causal


def test_lm_tied_embeddings():
    model = nb.models.create("transformer_lm", norm="ln", **TINY["transformer_lm"])
    assert model.head.weight is model.tok.weight


@pytest.mark.parametrize("value,init", [("sqrt_d", 32 ** 0.5), (2.5, 2.5)])
def test_lm_embed_scale_multiplies_the_summed_embeddings_and_learns(value, init):
    """The DyT authors' LLaMA recipe: a learnable scalar (init sqrt(d) or the number) on the embeddings, seen by
    the first block; without the option the first block sees GPT-2's plain sum."""
    torch.manual_seed(0)
    kw = TINY["transformer_lm"]
    plain = nb.models.create("transformer_lm", norm="dyt", **kw)
    scaled = nb.models.create("transformer_lm", norm="dyt", embed_scale=value, **kw)
    scaled.load_state_dict({**plain.state_dict(), "embed_scale": torch.tensor([init])})
    assert plain.embed_scale is None and scaled.embed_scale.item() == pytest.approx(init)
    seen = {}
    for name, m in (("plain", plain), ("scaled", scaled)):
        m.blocks[0].register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
    idx = torch.randint(0, 256, (2, 16))
    loss = scaled(idx).logsumexp(-1).mean()
    plain(idx)
    torch.testing.assert_close(seen["scaled"], init * seen["plain"], rtol=1e-6, atol=1e-7)
    loss.backward()
    assert scaled.embed_scale.grad is not None and scaled.embed_scale.grad.abs().item() > 0
    assert scaled.embed_scale.dim() == 1  # 1-D: never weight-decayed (optim.weight_decay decays dim >= 2)


@pytest.mark.parametrize("bad", ["sqrt", 0, -1.0, float("nan"), True])
def test_lm_bad_embed_scale_is_a_config_error(bad):
    with pytest.raises(nb.ConfigError, match=r"embed_scale=.* is not allowed; valid: null .*sqrt_d.*number > 0"):
        nb.models.create("transformer_lm", norm="ln", embed_scale=bad, **TINY["transformer_lm"])


# ---------------------------------------------------------------- plug-ins
def test_norm_registered_in_a_test_works_in_every_backbone():
    @nb.norms.register("scale_only")
    class ScaleOnly(nn.Module):
        def __init__(self, num_features, layout="image", init=1.0):
            super().__init__()
            self.layout = layout
            self.g = nn.Parameter(torch.full((num_features,), init))

        def forward(self, x, mask=None):
            shape = (1, -1, 1, 1) if self.layout == "image" else (1, 1, -1)
            return x * self.g.view(shape)

    try:
        for backbone, kw in TINY.items():
            model = nb.models.create(backbone, norm={"name": "scale_only", "init": 0.5}, **kw)
            assert sum(isinstance(m, ScaleOnly) for m in model.modules()) == EXPECTED_SITES[backbone]
            model(_input(backbone)).float().sum().backward()
    finally:
        nb.norms.REGISTRY.unregister("scale_only")


def test_norm_as_callable_and_import_path():
    model = nb.models.create("vgg11", norm=nb.norms.rms.RMSNorm, width=0.125)
    assert nb.models.count_norms(model) == 8
    model = nb.models.create("transformer_lm", norm="torch.nn:LayerNorm", **TINY["transformer_lm"])
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 5


# ---------------------------------------------------------------- bad input
def test_unknown_backbone_lists_valid():
    with pytest.raises(nb.ConfigError, match=r"unknown backbone 'resnet21'.*valid: .*resnet20.*did you mean"):
        nb.models.create("resnet21")


def test_unknown_backbone_option_lists_valid():
    with pytest.raises(nb.ConfigError, match=r"backbone 'vit' has no option 'ffn_nrom'.*did you mean 'ffn_norm'"):
        nb.models.create("vit", ffn_nrom="bn")


def test_bad_option_value_lists_valid():
    with pytest.raises(nb.ConfigError, match=r"norm_position='middle' is not allowed; valid: before_act, after_act"):
        nb.models.create("vgg11", norm_position="middle")
    with pytest.raises(nb.ConfigError, match=r"unknown norm 'batchnorm'"):
        nb.models.create("vit", ffn_norm="batchnorm")


def test_unknown_norm_option_fails_before_model_is_built():
    with pytest.raises(nb.ConfigError, match=r"norm 'ln' got unknown option\(s\) momentum"):
        nb.models.create("resnet20", norm={"name": "ln", "momentum": 0.1})


def test_bn_training_single_value_per_channel_error_in_model():
    model = nb.models.create("transformer_lm", norm="bn", **TINY["transformer_lm"])
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(torch.randint(0, 256, (1, 1)))  # one sequence of one token: one value per channel
    model = nb.models.create("vgg11", norm="bn", width=0.125)
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(torch.randn(1, 3, 16, 16))  # the last convs see 1x1 maps of a single image
