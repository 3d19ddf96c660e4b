"""Lightning tasks: thin modules that receive their network."""
from .base import NormTask, using_batch_statistics
from .classification import ClassificationTask
from .language_model import LanguageModelTask

__all__ = ["ClassificationTask", "LanguageModelTask", "NormTask", "using_batch_statistics"]
