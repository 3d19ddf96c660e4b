"""Pruners: a sweep spec's ``pruner`` name -> one of Optuna's own pruner classes (``optuna.pruners``, a class per
strategy), with the spec's other keys as that class's keyword arguments::

    pruner: {name: median, n_startup_trials: 5, n_warmup_steps: 100}

Pruners compare a trial's validation metric with other trials' *at the same step* (steps = optimizer steps). A
new strategy is one line in ``PRUNERS``. Optuna is imported only when a pruner is built (``--help`` stays light).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, did_you_mean, unknown

PRUNERS: dict[str, str] = {  # spec name -> class in optuna.pruners
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "threshold": "ThresholdPruner",  # stop a trial whose metric leaves [lower, upper] (e.g. loss above a bound)
}
# Defaults that depend on the run, set where the spec gives none: hyperband's largest budget is the run's steps
# (None: trainer.max_epochs, whose steps are known only at run time -> Optuna's "auto").
RUN_DEFAULTS: dict[str, Callable[[int | None], dict[str, Any]]] = {
    "hyperband": lambda max_steps: {"max_resource": max_steps or "auto"},
}


def make_pruner(p: dict[str, Any], max_steps: int | None):
    """An Optuna pruner from a checked spec entry ``{name: ..., **kwargs}``; ``max_steps``: a trial's budget."""
    import optuna

    name = p["name"]
    if name not in PRUNERS:
        raise unknown("pruner", name, PRUNERS)
    kw = {k: v for k, v in p.items() if k != "name"}
    for k, v in RUN_DEFAULTS.get(name, lambda _: {})(max_steps).items():
        kw.setdefault(k, v)
    return getattr(optuna.pruners, PRUNERS[name])(**kw)


def check_pruner(p: Any, where: str) -> dict[str, Any]:
    """A spec's ``pruner`` (a name or a mapping with ``name``) normalized to a mapping; an unknown name or an
    argument the class does not take is a ``ConfigError`` naming it."""
    if p is None:
        return {"name": "none"}
    if isinstance(p, str):
        p = {"name": p}
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or p["name"] not in PRUNERS:
        name = p.get("name") if isinstance(p, dict) else p
        raise ConfigError(f"{where}: pruner {name!r} is not known; valid: {', '.join(PRUNERS)}"
                          + did_you_mean(name, PRUNERS))
    try:
        make_pruner(p, max_steps=100)
    except (TypeError, ValueError) as e:  # TypeError: a key the class does not take; ValueError: a bad value
        raise ConfigError(f"{where}: pruner {p}: {e}") from None
    return dict(p)
