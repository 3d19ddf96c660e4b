"""Dotted config keys (``"optim.lr"``) on nested mappings: the one reader and the one writer that run configs,
sweep specs, study kinds and reports share. Ground floor: imports nothing."""
from __future__ import annotations

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
