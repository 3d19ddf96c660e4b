"""Any timm model by name: ``model.backbone: timm/<name>`` (e.g. ``timm/resnet18``, ``timm/convnext_atto``,
``timm/vit_tiny_patch16_224`` with ``img_size: 32``), with the run's norm in every normalization site.

Options are ``timm.create_model``'s keyword arguments: the model class's constructor arguments (``depth``,
``embed_dim``, ``drop_path_rate``, ``conv_mlp``, ...; the named model's own settings apply where the config gives
none) and ``pretrained``, which must stay false: normablate builds timm models from scratch (no hub download on
these machines, and the norms being ablated would not match pretrained weights anyway). ``num_classes`` and
``in_chans`` come from the data, and ``img_size`` from its image size where the class takes one.

How the norm gets in (``build``): the model is first built on the meta device with timm's own norms, to find
its norm sites and the layout each sees (``surgery.find_sites``). Where the class takes ``norm_layer``, every
site sees one layout and none carries an activation, the norm goes in through ``norm_layer`` (so timm's own init
of norm weights, e.g. ResNet's zero-init of each block's last norm, applies) and must land in exactly the sites
of the timm-norm build; otherwise (e.g. a ConvNeXt with ``conv_mlp: false``, whose blocks run LayerNorm on
channels-last NHWC while the stem and downsamples run LayerNorm2d on NCHW) every site is swapped by
``surgery.swap_norms``. Either way the built model is checked: every norm in it is ours and sits at a site of the
timm-norm build. A model with a norm that cannot be swapped (e.g. ConvNeXt-V2's GlobalResponseNorm) is refused,
naming each such module; a norm-free one (nf_resnet) takes only ``none``.

timm is imported only inside these functions (it takes seconds to import).
"""
from __future__ import annotations

import inspect
from functools import lru_cache, partial
from typing import Any

from torch import nn

from ..errors import ConfigError, did_you_mean

PREFIX = "timm/"
_NOT_OPTIONS = {"self", "norm_layer", "device", "dtype", "pretrained_cfg", "pretrained_cfg_overlay"}


def _timm():
    import timm  # lazy: seconds of start-up (torchvision) for every command that does not build a timm model

    return timm


def _arch(name: str) -> str:
    arch = name[len(PREFIX):] if name.startswith(PREFIX) else name
    timm = _timm()
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm model {arch!r} (backbone {PREFIX + arch!r})" + did_you_mean(
            arch, timm.list_models()) + "; the names: python -c 'import timm; print(timm.list_models())'")
    return arch


def _probe(arch: str, options: dict[str, Any]) -> nn.Module:
    """The model with timm's own norms, on the meta device (no memory): its sites and class. An option value timm
    rejects is a ConfigError naming the options; a model that cannot be built on the meta device one naming it."""
    import torch

    try:
        with torch.device("meta"):
            return _timm().create_model(arch, pretrained=False, **options)
    except (TypeError, ValueError, AssertionError, KeyError) as e:  # a bad option value: the user's mistake
        if isinstance(e, ConfigError):
            raise
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise ConfigError(f"timm model {arch!r} cannot be built with {opts}: {type(e).__name__}: {e}") from None
    except (RuntimeError, NotImplementedError) as e:  # an op without a meta kernel: the model, not the options
        raise ConfigError(f"timm model {arch!r} cannot be built on the meta device (normablate probes a model's "
                          f"norm sites there, without memory): {type(e).__name__}: {e}") from None


def _class_options(cls: type) -> tuple[dict[str, Any], bool]:
    """Constructor options of a timm model class with their defaults (None where it has none), its base classes'
    too while a constructor passes ``**kwargs`` on (e.g. LevitDistilled); whether it takes ``norm_layer``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    opts: dict[str, Any] = {}
    takes_norm_layer = False
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        for k, p in params.items():
            if p.kind in kinds and k not in _NOT_OPTIONS:
                opts.setdefault(k, None if p.default is inspect.Parameter.empty else p.default)
        takes_norm_layer = takes_norm_layer or "norm_layer" in params
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return opts, takes_norm_layer


@lru_cache(maxsize=None)
def info(name: str):
    """The ``BackboneInfo`` of ``timm/<name>``: an image classifier; layout ``tokens`` when every norm of the
    default model sees tokens (a ViT), else ``image``; options from the model class (module docstring)."""
    from . import BackboneInfo
    from ..surgery import find_sites

    arch = _arch(name)
    probe = _probe(arch, {})
    opts, _ = _class_options(type(probe))
    opts["pretrained"] = False
    kinds = {kind for kind, _ in find_sites(probe)[0].values()}
    layout = "tokens" if kinds == {"tokens"} else "image"
    inputs = {"img_size": "image_size"} if "img_size" in opts else {}
    return BackboneInfo(PREFIX + arch, partial(build, arch), layout, "classification", inputs, opts)


_PLANS: dict[tuple[str, str], tuple[dict[str, str], str | None]] = {}


def _plan(arch: str, options: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """Site name -> layout of timm's build with these options, and the layout ``norm_layer`` carries there (None:
    module surgery). Probed once per (arch, options) in a process (builds with the same options, e.g. a sweep
    worker's trials, share it): a meta build costs ~0.1-0.3 s, more than a tiny model's real build, as timm's init
    ops dispatch through Python on the meta device."""
    from .. import surgery

    key = (arch, repr(sorted(options.items())))
    if key not in _PLANS:
        probe = _probe(arch, options)
        found, refused = surgery.find_sites(probe)
        if refused:
            raise surgery.refusal(refused, f"timm model {arch!r}")
        kinds = {kind for kind, _ in found.values()}
        with_act = any(hasattr(m, "act") for _, m in found.values())  # timm's *NormAct*: surgery keeps the act
        one = len(kinds) == 1 and kinds <= {"image", "tokens"} and not with_act
        route = next(iter(kinds)) if one and _class_options(type(probe))[1] else None
        _PLANS[key] = ({name: kind for name, (kind, _) in found.items()}, route)
    return _PLANS[key]


def build(arch: str, norm_layer: Any, **options: Any) -> nn.Module:
    """timm's ``arch`` with ``norm_layer``'s norm (a ``norms.resolve`` result or any spec) in every norm site."""
    from .. import surgery

    if options.get("pretrained"):
        raise ConfigError(f"timm model {arch!r}: pretrained={options['pretrained']!r} is refused: normablate builds "
                          "timm models from scratch (no hub download here; pretrained weights would not match the "
                          "norms being ablated); leave pretrained unset or false")
    options.pop("pretrained", None)
    sites, route = _plan(arch, options)
    if not sites and getattr(norm_layer, "norm_name", None) != "none":  # a run labelled bn would hold no BN
        raise ConfigError(f"timm model {arch!r} has no normalization layer to replace (a norm-free design); "
                          f"use norm 'none', not {getattr(norm_layer, 'norm_name', norm_layer)!r}")
    model = None
    if route is not None:
        model = _through_norm_layer(arch, options, surgery.norm_layers(norm_layer)(route), set(sites))
    if model is None:
        model = _timm().create_model(arch, pretrained=False, **options)
        surgery.swap_norms(model, norm_layer)
    # the check: every norm of the model is one we put at a site of the timm-norm build (none left of timm's)
    ours = {id(surgery.unwrap(model.get_submodule(name))) for name in sites}
    left = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if surgery.looks_like_norm(m) and id(m) not in ours]
    if left:
        raise surgery.refusal(left, f"timm model {arch!r}")
    return model


def _through_norm_layer(arch: str, options: dict[str, Any], layer, site_names: set[str]) -> nn.Module | None:
    """timm's model built with ``norm_layer=layer``, or None when that does not put our norm in exactly the sites of
    the timm-norm build (the class calls it with arguments ours does not take, asserts on it, or uses it elsewhere)."""
    made: list[nn.Module] = []

    def recording(num_features: int, device: Any = None, dtype: Any = None) -> nn.Module:
        made.append(layer(num_features, device=device, dtype=dtype))
        return made[-1]

    try:
        model = _timm().create_model(arch, pretrained=False, norm_layer=recording, **options)
    except ConfigError:  # our norm refused its options or channel count: the user's to fix, whichever route
        raise
    except Exception:  # noqa: BLE001  the class calls norm_layer with other arguments, asserts on its type, reads
        return None  # a weight that `none` lacks (Swin), ...: this route does not fit; surgery (always valid) does
    ours = {id(m) for m in made}
    placed = {n for n, m in model.named_modules() if id(m) in ours}
    return model if placed == site_names else None


__all__ = ["PREFIX", "build", "info"]
