"""Dotted config keys (``"optim.lr"``) on nested mappings: the one reader, the one writer and the one flattener that
run configs, sweep specs, study kinds and reports share. Ground floor: imports nothing."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def get_dotted(d: Any, key: str, default: Any = None) -> Any:
    """``d["optim"]["lr"]`` for ``key="optim.lr"``; ``default`` where a part is missing or not a mapping."""
    cur = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set ``key`` in ``d``, creating (or replacing non-mapping) intermediate levels."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def flatten(d: dict, descend: Callable[[str], bool] = lambda key: True, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"width": 8}}`` -> ``{"model.width": 8}``: a mapping value is opened where ``descend(its dotted
    key)`` says so (at any depth), else kept whole; the inverse of ``set_dotted`` on each key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and descend(key):
            out.update(flatten(v, descend, key + "."))
        else:
            out[key] = v
    return out
