"""Errors that users see. Every message names the bad key or value and what is allowed."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class NormablateError(ValueError):
    """Base class for user-facing configuration and input errors."""


class ConfigError(NormablateError):
    """A config key, type or value is not allowed. Raised before anything is built."""


class RunFileError(NormablateError):
    """A file or folder of a run cannot be read or written (corrupt checkpoint, read-only or vanished folder). The
    message names the file and what to do; the last good checkpoint is left in place."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of ``name`` among ``choices`` (for 'did you mean' hints)."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown(kind: str, name: object, choices: Iterable[str]) -> ConfigError:
    """Build the standard 'unknown X' error: names the bad value, lists the valid ones, suggests one."""
    choices = sorted(str(c) for c in choices)
    hint = closest(str(name), choices)
    msg = f"unknown {kind} {name!r}; valid: {', '.join(choices)}"
    if hint is not None:
        msg += f" (did you mean {hint!r}?)"
    return ConfigError(msg)
