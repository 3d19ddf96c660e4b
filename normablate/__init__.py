"""normablate: ablate normalization layers in vision and language models.

``normablate.norms`` and ``normablate.models`` are imported on first use (PEP 562), so that importing the
package (e.g. for ``normablate --help`` or ``--version``) does not import torch and timm."""
from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, NormablateError

__version__ = "0.1.0"

_LAZY = ("models", "norms")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "NormablateError", "__version__", "models", "norms"]
