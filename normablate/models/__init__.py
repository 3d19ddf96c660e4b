"""Backbones, by name, with the normalization injected.

Contract of the registry: an entry is a builder ``build(norm_layer, **options) -> nn.Module`` registered with
the input ``layout`` its norms see (``"image"`` for CNNs, ``"tokens"`` for ViT and the LM). ``create`` resolves
the norm spec once into a ``norm_layer(num_features)`` callable and hands that to the builder; blocks never
see a norm name.

    import normablate as nb
    model = nb.models.create("resnet20", norm="bn")
    model = nb.models.create("vit", norm={"name": "bn", "momentum": 0.05}, ffn_norm="bn")
    model = nb.models.create("transformer_lm", norm="masked_bn", n_layer=2)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .. import norms
from ..errors import ConfigError, did_you_mean
from ..registry import Registry

REGISTRY = Registry("backbone", __doc__ or "")


def register(name: str, layout: str) -> Callable:
    """Register a builder ``build(norm_layer, **options)`` whose norms see ``layout`` inputs."""
    if layout not in norms.LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {', '.join(norms.LAYOUTS)}")

    def deco(fn: Callable) -> Callable:
        fn.layout = layout  # type: ignore[attr-defined]
        return REGISTRY.register(name, fn)

    return deco


def available() -> list[str]:
    """Names of the registered backbones."""
    return REGISTRY.available()


def options(name: str) -> dict[str, Any]:
    """Options of backbone ``name`` with their defaults (``norm`` excluded)."""
    sig = inspect.signature(REGISTRY.get(name))
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p.default for k, p in sig.parameters.items() if k != "norm_layer" and p.kind in kinds}


def layout(name: str) -> str:
    return REGISTRY.get(name).layout


def check_options(name: str, kwargs: dict[str, Any]) -> None:
    """Raise a ConfigError naming any option ``name`` does not take, with the valid ones."""
    valid = options(name)
    for key in kwargs:
        if key not in valid:
            raise ConfigError(
                f"backbone {name!r} has no option {key!r}; valid: {', '.join(sorted(valid))}" + did_you_mean(key, valid)
            )


def create(name: str, norm: Any = "bn", **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with ``norm`` (a name, ``{"name": ..., **options}``, or a callable)."""
    builder = REGISTRY.get(name)
    check_options(name, kwargs)
    norm_layer = norms.resolve(norm, builder.layout)
    return builder(norm_layer=norm_layer, **kwargs)


def count_norms(model: nn.Module) -> int:
    """Number of normalization modules in ``model``."""
    return sum(norms.is_norm(m) for m in model.modules())


from . import lm, resnet, vgg, vit  # noqa: E402,F401  (each registers itself)

__all__ = ["REGISTRY", "available", "count_norms", "create", "layout", "options", "register"]
