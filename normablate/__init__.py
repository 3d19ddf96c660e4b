"""normablate: ablate normalization layers in vision and language models."""
from . import models, norms
from .errors import ConfigError, NormablateError

__version__ = "0.1.0"

__all__ = ["ConfigError", "NormablateError", "__version__", "models", "norms"]
