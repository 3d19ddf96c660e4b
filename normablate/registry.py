"""A minimal name -> object registry (the fvcore/detectron2 pattern).

Each registry's docstring states the contract of what it holds. Names may also be given as an import
path ``package.module:Object``, so a user's own class works without registering it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError, unknown


class Registry:
    def __init__(self, kind: str, doc: str = "") -> None:
        self.kind = kind
        self.__doc__ = doc
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None, *, override: bool = False) -> Callable:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def deco(o: Any) -> Any:
            if not override and name in self._items and self._items[name] is not o:
                raise ConfigError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> Any:
        if not isinstance(name, str):
            raise ConfigError(f"{self.kind} name must be a string, got {type(name).__name__} {name!r}")
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return self._import(name)
        raise unknown(self.kind, name, self._items)

    def _import(self, path: str) -> Any:
        from .plugins import import_object

        return import_object(path, self.kind)  # the working directory counts, as with `python -m`

    def available(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.available()})"
