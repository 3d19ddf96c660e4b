"""Study kinds: one file per kind, each registers itself (like norms and backbones).

    lr_sensitivity  metric vs learning rate per norm: best LR, usable-LR range width
    batch_size      metric vs batch size per norm, with an LR scaling rule and a samples/steps budget
    convergence     steps and time to a target metric, training-loss AUC
    search          per group (e.g. per norm) an Optuna search over a hyperparameter space
    grid            any crossed grid, metric per configuration

Add one with ``@normablate.studies.register("name")`` on a ``StudyKind`` subclass (see ``base.py`` for the
contract); a spec then says ``kind: name``. A spec may also name ``package.module:Class``.
"""
from __future__ import annotations

from ..registry import Registry
from .base import Comparison, Section, SpecContext, StudyKind

REGISTRY = Registry("study kind", __doc__ or "")


def register(name: str, *, override: bool = False):
    """Class decorator: register a ``StudyKind`` subclass under ``name`` (sets its ``name``)."""

    def deco(cls: type[StudyKind]) -> type[StudyKind]:
        cls.name = name
        REGISTRY.register(name, cls, override=override)
        return cls

    return deco


def get(name: str) -> StudyKind:
    """An instance of the kind ``name`` (a ConfigError lists the known kinds)."""
    cls = REGISTRY.get(name)
    if not (isinstance(cls, type) and issubclass(cls, StudyKind)):
        from ..errors import ConfigError

        raise ConfigError(f"study kind {name!r} is {cls!r}, not a normablate.studies.StudyKind subclass")
    return cls()


def available() -> list[str]:
    return REGISTRY.available()


def owner_of(key: str) -> str | None:
    """The registered kind whose spec key ``key`` is (for a clear error when a spec uses another kind's key)."""
    for name in available():
        if key in REGISTRY.get(name).keys:
            return name
    return None


from . import batch_size, convergence, grid, lr_sensitivity, search  # noqa: E402,F401  (built-in kinds)

__all__ = ["REGISTRY", "Comparison", "Section", "SpecContext", "StudyKind", "available", "get", "owner_of",
           "register"]
