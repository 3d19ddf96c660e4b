"""The bench's sections: one module per section in this package, each registering itself (torch-free).

A section is a function ``run(settings) -> list[Row]`` plus what the report says about it: ``text`` (the paragraph
under its heading in benchmarks.md) and ``sizes(settings)`` (the sizes its numbers depend on, for its provenance
line). A module here registers its section on import::

    from . import register

    TEXT = "What the rows are and how to read the ratio."

    def sizes(s) -> str:
        return f"{s.repeats} interleaved repeats"

    @register("my_section", text=TEXT, sizes=sizes)
    def run(s):
        ...

Adding a section touches that one file: ``names()`` finds the modules of this package without importing them
(``pkgutil``), so ``normablate bench --only`` offers it, and ``get(name)`` imports it when it is run. ``ORDER``
places the built-in sections in the report; others come after them, by name. A section can also be registered
from anywhere (a plug-in, a test) with the same decorator before ``run_bench`` is called.

This module imports nothing heavy: ``normablate/cli.py`` reads ``names()`` for ``--only``'s choices while building
its parser, and ``normablate --help`` must not import torch.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import unknown

# the report's order of the built-in sections (and a run's): a section not named here comes after them, by name
ORDER = ("norms", "allocator", "inference", "vit_inference", "framework", "models", "transformer_steps", "startup",
         "data", "sweep")


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable  # (Settings) -> list[Row]
    text: str  # the paragraph under the section's heading in benchmarks.md
    sizes: Callable  # (Settings) -> str: the settings its numbers depend on (its provenance line)
    default: bool = True  # run by a plain `normablate bench` (False: only when asked, e.g. minutes long)


_REGISTRY: dict[str, Section] = {}


def register(name: str, *, text: str, sizes: Callable | None = None, default: bool = True) -> Callable:
    """Decorator: register ``run(settings) -> list[Row]`` as the bench section ``name``."""
    def deco(fn: Callable) -> Callable:
        old = _REGISTRY.get(name)
        again = old is not None and "<" not in fn.__qualname__ and \
            (old.run.__module__, old.run.__qualname__) == (fn.__module__, fn.__qualname__)  # its module re-imported
        if old is not None and old.run is not fn and not again:
            raise ValueError(f"bench section {name!r} is already registered (by {old.run.__module__})")
        _REGISTRY[name] = Section(name, fn, text, sizes or (lambda s: ""), default)
        return fn
    return deco


def _modules() -> list[str]:
    """The section modules of this package, found without importing them."""
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def _position(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def names() -> tuple[str, ...]:
    """Every section, in the report's order: this package's modules and any registered elsewhere."""
    return tuple(sorted({*_modules(), *_REGISTRY}, key=_position))


def get(name: str) -> Section:
    """The registered section ``name`` (its module is imported on first use)."""
    if name not in _REGISTRY and name in _modules():
        importlib.import_module(f"{__name__}.{name}")
    if name not in _REGISTRY:
        raise unknown("bench section", name, names())
    return _REGISTRY[name]


def defaults() -> tuple[str, ...]:
    """The sections a plain `normablate bench` runs (every section but those registered with ``default=False``)."""
    return tuple(n for n in names() if get(n).default)


def order() -> dict[str, int]:
    """{section: its rank in the report}, for sorting rows."""
    return {n: i for i, n in enumerate(names())}
