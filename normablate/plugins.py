"""Plug-ins: user code that registers norms, backbones or study kinds, imported before a config is validated.

Three ways, all resolved before any name is looked up:

- ``--plugin FILE_OR_MODULE`` (repeatable) on ``normablate train``, ``sweep`` and ``list``;
- a ``plugins:`` list in a run config (a sweep's trials inherit it from the base config or the overrides, and
  ``normablate sweep --plugin`` adds to it), so sweep workers and other machines load the same plug-ins;
- the ``normablate.plugins`` entry-point group of installed packages (``[project.entry-points."normablate.plugins"]
  my_norms = "my_pkg.norms"``), loaded once per process.

An entry ending in ``.py`` or naming an existing file is imported from that file (relative paths: to the current
directory) under its stem as module name, with its folder put on ``sys.path`` so that ``model.norm=stem:Class``
names the same module. Anything else is a module name, imported with the current directory on ``sys.path`` (as
``python -m`` has it), so ``model.norm=my_norms:ScaleOnly`` works for ``./my_norms.py`` without ``PYTHONPATH``.

Trust: importing a plug-in runs its code. A config or sweep spec that names plug-ins or import paths is code.

Hand-written: importlib does the work; what is ours is the file/module rule and the one-line errors.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ConfigError

GROUP = "normablate.plugins"
_entry_points_loaded = False


def _is_file_entry(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry or Path(entry).is_file()


def _with_cwd() -> None:
    """The current directory on ``sys.path`` (appended: an installed package is never shadowed by a local file)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_module(name: str) -> ModuleType:
    """``importlib.import_module``, retried with the current directory on ``sys.path`` when the top-level module
    is not found (the CLI's ``sys.path`` starts at its script's folder, not where the user works)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.split(".")[0] or os.getcwd() in sys.path:
            raise
    _with_cwd()
    return importlib.import_module(name)


def import_object(path: str, what: str = "import path") -> Any:
    """The object a ``"package.module:attr"`` path names (``attr`` may be dotted: ``mod:Class.method``), imported
    as ``import_module`` does (the working directory counts). Every dotted import path of a config goes through
    here: ``model.norm: pkg.mod:Class``, a backbone, a study kind, a sweep's ``trainer_fn``. ``what`` names the
    key in the ``ConfigError`` that a missing module or attribute raises."""
    module_name, sep, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {path!r} must be 'package.module:name'")
    try:
        module = import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from e
    return obj


def _load_file(entry: str) -> ModuleType:
    path = Path(entry).expanduser()
    if not path.is_file():
        raise ConfigError(f"plugin file {entry!r} does not exist (relative paths are taken from the current "
                          f"directory {os.getcwd()!r})")
    path = path.resolve()
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(f"plugin file {entry!r}: {name!r} is not a valid module name; rename the file")
    have = sys.modules.get(name)
    if have is not None:
        if getattr(have, "__file__", None) and Path(have.__file__).resolve() == path:
            return have
        raise ConfigError(f"plugin file {entry!r}: a module named {name!r} is already imported "
                          f"(from {getattr(have, '__file__', None) or 'built-in'}); rename the file")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)  # so "stem:Class" import paths and the plug-in's own imports find it
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        sys.modules.pop(name, None)
        raise
    except Exception as e:
        sys.modules.pop(name, None)
        raise ConfigError(f"plugin file {entry!r} failed to import: {type(e).__name__}: {e}") from e
    return module


def load_one(entry: str) -> ModuleType:
    """Import one plug-in: a ``.py`` file (or any existing file path) or a module name."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"plugins: {entry!r} must be a file path or a module name")
    if _is_file_entry(entry):
        return _load_file(entry)
    try:
        return import_module(entry)
    except ModuleNotFoundError as e:
        raise ConfigError(f"plugin module {entry!r} not found ({e}); give a file (my_norms.py) or an importable "
                          f"module name") from None
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"plugin module {entry!r} failed to import: {type(e).__name__}: {e}") from e


def load(entries: Iterable[str] | None) -> list[ModuleType]:
    """Import the entry-point plug-ins (once) and then ``entries``, in order; idempotent."""
    load_entry_points()
    if entries is None:
        return []
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise ConfigError(f"plugins={entries!r} must be a list of file paths or module names")
    return [load_one(e) for e in entries]


def load_entry_points() -> None:
    """Import every installed package's ``normablate.plugins`` entry point, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as e:
            raise ConfigError(f"plugin entry point {ep.name!r} ({ep.value}) of group {GROUP!r} failed to load: "
                              f"{type(e).__name__}: {e}") from e
