"""Errors that users see. Every message names the bad key or value and what is allowed."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


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


def did_you_mean(name: object, choices: Iterable[str], show: Callable[[str], str] = repr) -> str:
    """The one 'did you mean' suffix: `` (did you mean 'x'?)`` for the closest of ``choices``, else ``""``.
    ``show`` spells the suggestion (default: quoted; e.g. ``lambda h: prefix + h`` for a dotted key)."""
    hint = closest(str(name), choices)
    return f" (did you mean {show(hint)}?)" if hint is not None else ""


def unknown(kind: str, name: object, choices: Iterable[str]) -> ConfigError:
    """Build the standard 'unknown X' error: names the bad value, lists the valid ones, suggests one."""
    choices = sorted(str(c) for c in choices)
    return ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(choices)}" + did_you_mean(name, choices))
