"""Normalization layers, by name.

Contract of the registry: an entry is a class or factory called as
``entry(num_features, layout=..., **kwargs) -> nn.Module`` where ``layout`` is ``"image"`` (inputs
``(N, C, H, W)``) or ``"tokens"`` (inputs ``(N, T, C)``). The module's ``forward(x, mask=None)`` keeps the
shape; ``mask`` is ``(N, T)`` bool with True marking a real token (only the tokens layout uses it).

    import normablate as nb
    nb.norms.available()
    nb.norms.create("bn", 64, layout="image", momentum=0.1)

    @nb.norms.register("my_norm")
    class MyNorm(nn.Module):
        def __init__(self, num_features, layout="image", **kw): ...
        def forward(self, x, mask=None): ...
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import Registry

LAYOUTS = ("image", "tokens")

REGISTRY = Registry("norm", __doc__ or "")


def register(name: str, obj: Any = None, *, override: bool = False):
    """Register a norm class/factory ``(num_features, layout, **kwargs)``; usable as a decorator."""
    return REGISTRY.register(name, obj, override=override)


def available() -> list[str]:
    """Names of the registered norms."""
    return REGISTRY.available()


def _accepted_kwargs(fn: Callable) -> tuple[set[str], bool]:
    """Keyword names ``fn`` takes (after num_features) and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names, var_kw = set(), False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and i > 0:
            names.add(p.name)
    return names, var_kw


def options(name: str) -> list[str]:
    """Options (keyword arguments) the norm ``name`` accepts, besides ``num_features`` and ``layout``."""
    names, _ = _accepted_kwargs(REGISTRY.get(name))
    return sorted(names - {"layout"})


def _check_options(entry: Callable, label: str, layout: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if layout not in LAYOUTS:
        raise ConfigError(f"norm layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    names, var_kw = _accepted_kwargs(entry)
    if not var_kw:
        bad = sorted(set(kwargs) - names)
        if bad:
            valid = sorted(names - {"layout"}) or ["(none)"]
            raise ConfigError(f"norm {label!r} got unknown option(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    return _check_values(entry, label, kwargs)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric norm option: ``lo <= v <= hi`` (``open_lo``/``open_hi``: strict)."""

    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False
    why: str = ""

    def __contains__(self, v: float) -> bool:
        return (v > self.lo if self.open_lo else v >= self.lo) and (v < self.hi if self.open_hi else v <= self.hi)

    def __str__(self) -> str:
        lo = "(" if self.open_lo else "["
        hi = ")" if self.open_hi or self.hi == math.inf else "]"
        return f"{lo}{self.lo:g}, {self.hi:g}{hi}" + (f" ({self.why})" if self.why else "")


# Ranges of the options whose meaning is shared across the families (same name, same meaning). A norm class may
# add or override entries with a class attribute ``option_ranges = {"name": Range(...)}``. Checked when a spec is
# resolved (config validation), so a bad value fails before anything is built, not as NaN mid-run.
OPTION_RANGES: dict[str, Range] = {
    "eps": Range(0, math.inf, why="added to the variance"),
    "momentum": Range(0, 1, why="PyTorch convention: weight of the new batch statistic; null = cumulative average"),
    "alpha_fwd": Range(0, 1, open_hi=True, why="weight of the old value in the running average"),
    "alpha_bkw": Range(0, 1, open_hi=True, why="weight of the old value in the running average"),
    "num_groups": Range(1, math.inf),
    "noise_scale": Range(1, math.inf),
    "noise_mean": Range(0, math.inf),
    "alpha_init": Range(0, math.inf, open_lo=True),
    "r_max": Range(1, math.inf),
    "d_max": Range(0, math.inf),
    "warmup_steps": Range(0, math.inf),
    "warmup_iters": Range(0, math.inf),
    "r_max_steps": Range(0, math.inf),
    "d_max_steps": Range(0, math.inf),
    "group_scaling": Range(1, math.inf),
}


def _check_values(entry: Callable, label: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Option value types: those of the defaults (bool stays bool, numbers stay numbers; YAML 1.1's string "1e-3"
    becomes a float). Returns the (coerced) options. Ranges are checked when built (``_check_ranges``)."""
    out = dict(kwargs)
    try:
        params = inspect.signature(entry).parameters
    except (TypeError, ValueError):
        params = {}
    for key, v in kwargs.items():
        p = params.get(key)
        default = p.default if p is not None and p.default is not inspect.Parameter.empty else None
        if v is None:
            if default is not None and "None" not in str(p.annotation):
                raise ConfigError(f"norm {label!r} option {key}=null is not allowed (default {default!r})")
            continue
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"norm {label!r} option {key}={v!r} must be true or false")
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and isinstance(v, str):
            try:
                v = out[key] = float(v)
            except ValueError:
                pass
        if numeric and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"norm {label!r} option {key}={v!r} must be a number (default {default!r})")
    return out


def _check_ranges(entry: Callable, label: str, kwargs: Mapping[str, Any]) -> None:
    """Numeric option values: finite and in range (``OPTION_RANGES`` + the entry's ``option_ranges``). Runs after the
    constructor accepted them, so a norm's own, more specific message wins; catches what it lets through."""
    ranges = {**OPTION_RANGES, **(getattr(entry, "option_ranges", None) or {})}
    for key, v in kwargs.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"norm {label!r} option {key}={v!r} must be a finite number")
        if key in ranges and isinstance(v, (int, float)) and not isinstance(v, bool) and v not in ranges[key]:
            raise ConfigError(f"norm {label!r} option {key}={v!r} is out of range; allowed: {ranges[key]}")


def _build(entry: Callable, label: str, num_features: int, layout: str, kwargs: Mapping[str, Any]) -> nn.Module:
    kwargs = _check_options(entry, label, layout, kwargs)
    names, var_kw = _accepted_kwargs(entry)
    try:
        if "layout" in names or var_kw:
            module = entry(num_features, layout=layout, **kwargs)
        elif layout != "image" and not kwargs:
            # A plain callable such as nn.LayerNorm, taking channels only: works on channel-last tokens.
            module = entry(num_features)
        else:
            module = entry(num_features, **kwargs)
    except (ValueError, TypeError) as e:  # a bad option value (e.g. num_groups not dividing C): a config error
        opts = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
        raise ConfigError(f"norm {label!r} ({opts}) cannot be built for {num_features} channels: {e}") from e
    _check_ranges(entry, label, kwargs)
    return module


def create(name: str, num_features: int, layout: str = "image", **kwargs: Any) -> nn.Module:
    """Build the norm ``name`` for ``num_features`` channels in ``layout``."""
    return _build(REGISTRY.get(name), name, num_features, layout, kwargs)


def resolve(spec: Any, layout: str, where: str | None = None) -> Callable[[int], nn.Module]:
    """Turn a norm spec into a ``norm_layer(num_features) -> nn.Module`` callable, once.

    ``spec`` is a registered name or import path, a mapping ``{"name": ..., **options}``, or a callable
    (a class or factory taking ``num_features`` and optionally ``layout`` and options). Option names are
    checked here, so a typo fails before any model is built; bad values fail as ConfigError when built.
    ``where`` (e.g. ``"model.attn_norm='bogus'"``) prefixes every such error, here and at build time, so that a
    model with several norm specs says which one is wrong.
    """
    if where is not None:
        try:
            inner = resolve(spec, layout)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

        def named_layer(num_features: int, device: Any = None, dtype: Any = None) -> nn.Module:
            try:
                return inner(num_features, device=device, dtype=dtype)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None

        named_layer.norm_name, named_layer.layout = inner.norm_name, inner.layout  # type: ignore[attr-defined]
        named_layer.spec = spec  # type: ignore[attr-defined]
        return named_layer
    if isinstance(spec, str):
        name, kwargs, entry = spec, {}, REGISTRY.get(spec)
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise ConfigError(f"norm spec {dict(spec)!r} has no 'name'; valid names: {', '.join(available())}")
        name = kwargs.pop("name")
        entry = REGISTRY.get(name)
    elif callable(spec):
        name, kwargs, entry = getattr(spec, "__name__", repr(spec)), {}, spec
    else:
        raise ConfigError(
            f"norm must be a name, a mapping with 'name', or a callable; got {type(spec).__name__} {spec!r}"
        )
    if layout not in LAYOUTS:
        raise ConfigError(f"norm layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    kwargs = _check_options(entry, name, layout, kwargs)  # option names and values now; values when the model is built

    # A plain function (not a partial): timm's get_norm_layer unbinds partials and passes device/dtype.
    def norm_layer(num_features: int, device: Any = None, dtype: Any = None) -> nn.Module:
        module = _build(entry, name, num_features, layout, kwargs)
        return module.to(device=device, dtype=dtype) if device is not None or dtype is not None else module

    norm_layer.norm_name = name  # type: ignore[attr-defined]
    norm_layer.layout = layout  # type: ignore[attr-defined]
    norm_layer.spec = spec  # type: ignore[attr-defined]  (re-resolved for another layout: surgery.norm_layers)
    return norm_layer


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (ours, PyTorch's or timm's)."""
    base = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    return isinstance(module, base) or getattr(module, "is_normalization", False)


# Register the built-in families (each file registers itself on import).
from . import batch, dyt, group, identity, layer, masked, powernorm, renorm, rms  # noqa: E402,F401

__all__ = ["LAYOUTS", "REGISTRY", "available", "create", "is_norm", "options", "register", "resolve"]
