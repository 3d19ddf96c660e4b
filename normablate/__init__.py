"""normablate: ablate normalization layers in vision and language models.

``normablate.norms``, ``normablate.models`` and ``normablate.swap_norms`` (``surgery.py``: put a norm in every
normalization site of any ``nn.Module``) are imported on first use (PEP 562), so that importing the package (e.g.
for ``normablate --help`` or ``--version``) does not import torch and timm."""
from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, NormablateError

__version__ = "0.1.0"

_LAZY = ("models", "norms")
_LAZY_ATTRS = {"swap_norms": "surgery", "SwapReport": "surgery"}  # name -> module that defines it


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "NormablateError", "SwapReport", "__version__", "models", "norms", "swap_norms"]
