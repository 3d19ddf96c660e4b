"""Module surgery: put a registered norm in every normalization site of any ``nn.Module`` (``swap_norms``).

Why by hand: neither PyTorch nor timm replaces norm layers generically (timm's ``convert_sync_batchnorm`` and
``freeze_batch_norm_2d`` handle one family each). A site's *layout* decides how the new norm is built, and it
follows from the class of the module it replaces, never from a guess:

- channels first, ``(N, C, H, W)`` -> ``layout="image"``: ``BatchNorm2d``, ``InstanceNorm2d``, ``GroupNorm``,
  timm's ``LayerNorm2d``, ``RmsNorm2d``, ``SimpleNorm2d``, ``GroupNorm1``, ``FrozenBatchNorm2d`` (and their
  ``*Fp32`` / ``*Act2d`` forms);
- channels last, ``(N, ..., C)`` -> ``layout="tokens"``: ``nn.LayerNorm``, ``nn.RMSNorm``, timm's ``LayerNorm``,
  ``RmsNorm``, ``SimpleNorm`` (and their ``*Fp32`` / ``*Act`` forms), with a 1-D ``normalized_shape``. A ViT's
  norms see ``(N, T, C)``; the LayerNorm inside a timm ConvNeXt block with ``conv_mlp=False`` sees ``(N, H, W, C)``
  (the block permutes to channels last around it, ``timm/models/convnext.py``): every built-in norm's tokens
  layout reduces over the last dim and takes any ``(N, ..., C)``, so both are the same kind of site;
- ``BatchNorm1d`` / ``InstanceNorm1d`` (``(N, C)`` or ``(N, C, L)``): the tokens layout inside ``ChannelsFirst``,
  which moves the channel last for 3-D inputs and back;
- a norm from this package (or a plug-in norm with a ``layout`` attribute): its own layout.

timm's norm + activation modules (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``, ...) become
``NormAct(norm, drop, act)``: their dropout and activation are kept. Anything else that is a normalization
(``BatchNorm3d``, ``LocalResponseNorm``, ``SyncBatchNorm``, timm's ``GlobalResponseNorm``, ``EvoNorm*``, a
LayerNorm over several dims, ...) cannot be swapped: the call is refused, naming every such module, and the
model is left untouched. Each new norm is freshly initialised (an architecture's own init of its norm weights,
e.g. timm ResNet's zero-init of each block's last BN, is not replayed), on the old module's device and dtype, in
its train/eval mode.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import norms
from .errors import ConfigError

# Class names (exact, not subclasses: a subclass may change forward) -> the layout of the site.
_IMAGE = {
    "BatchNorm2d", "InstanceNorm2d", "GroupNorm", "GroupNorm1", "LayerNorm2d", "LayerNorm2dFp32", "RmsNorm2d",
    "RmsNorm2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32", "FrozenBatchNorm2d",
    "BatchNormAct2d", "FrozenBatchNormAct2d", "GroupNormAct", "GroupNorm1Act", "LayerNormAct2d",
    "LayerNormAct2dFp32", "RmsNormAct2d", "RmsNormAct2dFp32",
}
_TOKENS = {
    "LayerNorm", "LayerNormFp32", "RMSNorm", "RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32",
    "LayerNormAct", "LayerNormActFp32", "RmsNormAct", "RmsNormActFp32",
}
_CHANNELS_FIRST_1D = {"BatchNorm1d", "InstanceNorm1d"}
_FOREIGN = ("torch.nn.", "timm.", "torchvision.")  # modules whose classes the tables above name
# A class named like a norm (``...Norm``, ``...Norm2d``, ``...NormAct2d``, ``...NormFp32``, ``EvoNorm...``) is a norm
# site even when ``norms.is_norm`` does not know it; so an unknown one is refused rather than left in place.
_NORM_NAME = re.compile(r"Norm(Act)?(\dd)?(Fp32)?$|^EvoNorm|^FilterResponseNorm")
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # a module holding one of these is a block, not a norm


class NormAct(nn.Module):
    """A norm followed by the dropout and activation of the timm ``*NormAct*`` module it replaced."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class ChannelsFirst(nn.Module):
    """A channels-last (tokens) norm at a ``BatchNorm1d`` site: ``(N, C)`` as is, ``(N, C, L)`` as ``(N, L, C)``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return self.norm(x)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


@dataclass
class SwapReport:
    """What ``swap_norms`` did. ``sites``: site name -> class it replaced; ``layouts``: site name -> layout;
    ``counts``: replaced class -> how many; ``module``: the model (a new object only when the root was a norm)."""

    norm: str
    module: nn.Module
    sites: dict[str, str] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(self.sites.values()))

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        what = ", ".join(f"{n} {c}" for c, n in sorted(self.counts.items())) or "nothing"
        return f"swap_norms: {len(self)} site(s) -> {self.norm!r}: {what}"


def looks_like_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: ``norms.is_norm``, or a class named like one (timm's RmsNorm,
    FrozenBatchNorm2d, GlobalResponseNorm, EvoNorm2dB0, ...) that is not a block around other layers (timm's
    ``ConvNormAct``, ``ConvMlpWithNorm``: their norm is a child, a site of its own). Our wrappers (``NormAct``,
    ``ChannelsFirst``) are containers, not norms."""
    if isinstance(module, (NormAct, ChannelsFirst)):
        return False
    if norms.is_norm(module):
        return True
    if not _NORM_NAME.search(type(module).__name__):
        return False
    return not any(isinstance(m, _LAYERS) or looks_like_norm(m) for m in module.children())


def unwrap(module: nn.Module) -> nn.Module:
    """The norm inside a ``NormAct`` / ``ChannelsFirst`` made here; any other module as is."""
    return module.norm if isinstance(module, (NormAct, ChannelsFirst)) else module


def _site_layout(module: nn.Module, default: str | None) -> str | None:
    """``"image"``, ``"tokens"``, ``"channels_first_1d"``, or None (cannot be swapped)."""
    cls = type(module)
    foreign = cls.__module__.startswith(_FOREIGN)
    if foreign:
        name = cls.__name__
        if name in _TOKENS:
            shape = getattr(module, "normalized_shape", (0,))
            return "tokens" if len(tuple(shape)) == 1 else None  # a LayerNorm over (C, H, W) has no equivalent
        if name in _IMAGE:
            return "image"
        return "channels_first_1d" if name in _CHANNELS_FIRST_1D else None
    own = getattr(module, "layout", None)
    return own if own in norms.LAYOUTS else default


def _channels(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and len(tuple(shape)) == 1:
        return int(tuple(shape)[0])
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def _placement(module: nn.Module) -> dict[str, Any]:
    t = next((t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
              if t.is_floating_point()), None)
    return {} if t is None else {"device": t.device, "dtype": t.dtype}


def norm_layers(norm: Any) -> Callable[[str], Callable[..., nn.Module]]:
    """``layout -> norm_layer`` for a spec (name, mapping, callable) or a ``norms.resolve`` result (its spec is
    re-resolved for the other layout). Each layout is resolved once."""
    spec = getattr(norm, "spec", norm) if hasattr(norm, "norm_name") else norm
    cache: dict[str, Callable[..., nn.Module]] = {}

    def get(layout: str) -> Callable[..., nn.Module]:
        if layout not in cache:
            cache[layout] = norms.resolve(spec, layout)
        return cache[layout]

    return get


def _spec_name(norm: Any) -> str:
    if isinstance(norm, str):
        return norm
    if isinstance(norm, dict):
        return str(norm.get("name"))
    return str(getattr(norm, "norm_name", None) or getattr(norm, "__name__", repr(norm)))


def _build(old: nn.Module, kind: str, layer_for: Callable[[str], Callable[..., nn.Module]], c: int) -> nn.Module:
    new = layer_for("tokens" if kind == "channels_first_1d" else kind)(c, **_placement(old))
    if kind == "channels_first_1d":
        new = ChannelsFirst(new)
    if hasattr(old, "act") and hasattr(old, "drop") and type(old).__module__.startswith("timm."):
        new = NormAct(new, old.drop, old.act)  # timm's norm + act: keep the dropout and activation
    return new.train(old.training)


def find_sites(module: nn.Module, layout: str | None = None) -> tuple[dict[str, tuple[str, nn.Module]], list[str]]:
    """The norm sites of ``module``: ``({name: (kind, module)}, refused)`` where kind is ``"image"``, ``"tokens"`` or
    ``"channels_first_1d"`` and ``refused`` lists ``"name (Class)"`` for each norm that cannot be swapped. A module
    shared by several parents appears once, under its first name."""
    sites: dict[str, tuple[str, nn.Module]] = {}
    refused: list[str] = []
    for name, m in module.named_modules():  # duplicates removed: a shared norm is one site
        if not looks_like_norm(m):
            continue
        kind = _site_layout(m, layout)
        if kind is None or _channels(m) is None:
            refused.append(f"{name or '(root)'} ({type(m).__name__})")
        else:
            sites[name or "(root)"] = (kind, m)
    return sites, refused


def refusal(refused: list[str], what: str) -> ConfigError:
    """The error for norms that cannot be swapped: names every one of them and what can be."""
    return ConfigError(
        f"cannot swap {len(refused)} normalization module(s) for {what}: {', '.join(refused)}; swappable: "
        "BatchNorm1d/2d, InstanceNorm1d/2d, LayerNorm (1-D shape), LayerNorm2d, GroupNorm, RMSNorm/RmsNorm(2d), "
        "SimpleNorm(2d), FrozenBatchNorm2d, timm's *NormAct* forms, and this package's norms")


def swap_norms(module: nn.Module, norm: Any, layout: str | None = None) -> SwapReport:
    """Replace every normalization module of ``module`` by the norm ``norm``, in place; return a ``SwapReport``.

    ``norm``: a registered name, ``{"name": ..., **options}``, a callable, or a ``norms.resolve`` result.
    ``layout``: the layout of sites whose class does not tell (a plug-in norm class without a ``layout``
    attribute); None refuses them. A site's layout is otherwise fixed by its class (module docstring).
    Raises ``ConfigError`` naming every module that cannot be swapped, before changing anything (every new norm
    is built before the first is put in place). A shared norm module stays shared. ``report.module`` is
    ``module`` itself unless ``module`` is a norm, then its replacement.

        >>> report = normablate.swap_norms(my_net, "rms")
        >>> print(report)          # swap_norms: 5 site(s) -> 'rms': 2 BatchNorm2d, 3 LayerNorm
    """
    if layout is not None and layout not in norms.LAYOUTS:
        raise ConfigError(f"swap_norms: layout {layout!r} is not one of {', '.join(norms.LAYOUTS)} (or None)")
    sites, refused = find_sites(module, layout)
    if refused:
        raise refusal(refused, repr(_spec_name(norm)))
    layer_for = norm_layers(norm)
    built = {id(old): _build(old, kind, layer_for, _channels(old)) for kind, old in sites.values()}
    report = SwapReport(norm=_spec_name(norm), module=module)
    for name, (kind, old) in sites.items():
        report.sites[name] = type(old).__name__
        report.layouts[name] = "tokens" if kind == "channels_first_1d" else kind
    if id(module) in built:  # the root itself is a norm
        report.module = built[id(module)]
        return report
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in built:
                setattr(parent, child_name, built[id(child)])
    return report


__all__ = ["ChannelsFirst", "NormAct", "SwapReport", "find_sites", "looks_like_norm", "norm_layers", "refusal",
           "swap_norms", "unwrap"]
