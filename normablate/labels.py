"""Readable labels of config values, shared by sweep specs (axis labels, run names) and the statistics that name
the configurations they compare (``analysis.verdicts``); a ground-floor module so neither imports the other."""
from __future__ import annotations

from typing import Any


def value_label(v: Any) -> str:
    """Readable label of an axis value: ``bn``, ``0.1``, ``bn(momentum=0.01)``."""
    if isinstance(v, dict):
        v = dict(v)
        name = v.pop("name", "?")
        return f"{name}(" + ",".join(f"{k}={value_label(x)}" for k, x in sorted(v.items())) + ")" if v else str(name)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value_label(x) for x in v) + "]"
    return str(v)
