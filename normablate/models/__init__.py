"""Backbones, by name, with the normalization injected.

Contract of the registry: an entry is a builder ``build(norm_layer, **options) -> nn.Module`` registered with every
fact the rest of the framework needs about it (a ``BackboneInfo``), so nothing above this package switches on a
backbone's name:

- ``layout``: what its norms see, ``"image"`` (N, C, H, W: CNNs) or ``"tokens"`` (N, T, C: ViT, the LM);
- ``task``: the task it serves (a name in ``normablate.tasks``: ``"classification"``, ``"lm"``), the default of a
  config's ``task``;
- ``inputs``: builder option -> the data fact that fills it when the config leaves it unset, e.g. the ViT's
  ``{"img_size": "image_size"}``. An option named like a fact of its task (``num_classes``, ``in_chans``,
  ``image_size``; ``vocab_size``, ``block_size``) is filled from that fact without being listed;
- ``options``: the builder's keyword options with their defaults (read from its signature).

``create`` resolves the norm spec once into a ``norm_layer(num_features)`` callable and hands that to the builder;
blocks never see a norm name. Names ``timm/<model>`` are any timm model (``models/timm_zoo.py``, imported on first
use: timm takes seconds to import).

    import normablate as nb
    model = nb.models.create("resnet20", norm="bn")
    model = nb.models.create("vit", norm={"name": "bn", "momentum": 0.05}, ffn_norm="bn")
    model = nb.models.create("transformer_lm", norm="masked_bn", n_layer=2)

    @nb.models.register("my_lm", layout="tokens", task="lm")      # a plug-in backbone: trains with task: lm
    def my_lm(norm_layer, vocab_size=256, block_size=64, width=64): ...
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import norms
from ..errors import ConfigError, did_you_mean
from ..registry import Registry

REGISTRY = Registry("backbone", __doc__ or "")


@dataclass(frozen=True)
class BackboneInfo:
    """Every fact about one backbone (module docstring); ``models.info(name)`` returns it."""

    name: str
    builder: Callable  # build(norm_layer, **options) -> nn.Module
    layout: str  # "image" | "tokens": what its norms see
    task: str  # "classification" | "lm" | another registered task: the default of a config's task
    inputs: Mapping[str, str] = field(default_factory=dict)  # builder option -> data fact (explicit ones only)
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword options -> defaults (norm_layer excluded)

    def input_options(self, facts: tuple[str, ...]) -> dict[str, str]:
        """Builder option -> data fact for the ``facts`` a task's data provides: the options named like a fact,
        then the explicit ``inputs`` (which may rename, e.g. ``img_size`` <- ``image_size``)."""
        out = {f: f for f in facts if f in self.options}
        out.update({opt: fact for opt, fact in self.inputs.items() if fact in facts})
        return out


def builder_options(fn: Callable) -> dict[str, Any]:
    """Keyword options of a builder with their defaults (``norm_layer`` excluded)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k != "norm_layer" and p.kind in kinds}


def register(name: str, layout: str, task: str = "classification",
             inputs: Mapping[str, str] | None = None) -> Callable:
    """Register a builder ``build(norm_layer, **options)`` with its facts (module docstring); ``inputs`` maps builder
    options to data facts beyond the same-named ones."""
    if layout not in norms.LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {', '.join(norms.LAYOUTS)}")

    def deco(fn: Callable) -> Callable:
        opts = builder_options(fn)
        bad = [k for k in inputs or {} if k not in opts]
        if bad:
            raise ConfigError(f"backbone {name!r}: inputs name {bad}, which are not options of its builder; valid: "
                              f"{', '.join(sorted(opts))}")
        info_ = BackboneInfo(name, fn, layout, task, dict(inputs or {}), opts)
        if name not in REGISTRY or REGISTRY.get(name).builder is not fn:  # the same builder twice: no error
            REGISTRY.register(name, info_)
        fn.backbone_info = info_  # type: ignore[attr-defined]  (an import path to the builder finds its facts)
        return fn

    return deco


def info(name: str) -> BackboneInfo:
    """The facts of backbone ``name`` (a registered name, ``timm/<model>``, or ``pkg.mod:builder``)."""
    if isinstance(name, str) and name.startswith("timm/"):
        from .timm_zoo import info as _timm_info

        return _timm_info(name)
    entry = REGISTRY.get(name)  # unknown name -> lists the valid ones
    if isinstance(entry, BackboneInfo):
        return entry
    found = getattr(entry, "backbone_info", None)
    if isinstance(found, BackboneInfo):
        return found
    raise ConfigError(f"backbone {name!r} is not a registered builder: decorate it with "
                      f"@normablate.models.register(name, layout=..., task=...) (README 'Adding a backbone')")


def available() -> list[str]:
    """Names of the registered backbones."""
    return REGISTRY.available()


def options(name: str) -> dict[str, Any]:
    """Options of backbone ``name`` with their defaults (``norm`` excluded)."""
    return dict(info(name).options)


def layout(name: str) -> str:
    return info(name).layout


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
    entry = info(name)
    check_options(name, kwargs)
    norm_layer = norms.resolve(norm, entry.layout)
    return entry.builder(norm_layer=norm_layer, **kwargs)


def count_norms(model: nn.Module) -> int:
    """Number of normalization modules in ``model``."""
    return sum(norms.is_norm(m) for m in model.modules())


from . import lm, resnet, vgg, vit  # noqa: E402,F401  (each registers itself)

__all__ = ["REGISTRY", "BackboneInfo", "available", "count_norms", "create", "info", "layout", "options", "register"]
