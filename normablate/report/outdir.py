"""The report's output folder: ``report`` writes and deletes only the files it owns.

A folder ``report`` has written holds ``MANIFEST`` (``.normablate-report.json``): the names of the files the last
report wrote. A new report deletes only files named there that it did not write again (a figure the study no
longer has); a file anyone else put in the folder is never touched. A non-empty folder with no manifest is refused
(``--out`` pointed at a folder of the user's), except the study's default ``<log_dir>/<study>/report`` folder
(reports written before the manifest existed), where nothing unlisted is deleted either.

Hand-written: neither pandas nor matplotlib keeps track of the files a program wrote.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError

MANIFEST = ".normablate-report.json"


def _listing(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir() if p.is_file()}


def owned(out: Path) -> list[str]:
    """The files the last report listed in ``out``'s manifest ([] when there is none or it cannot be read)."""
    try:
        names = json.loads((out / MANIFEST).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..", MANIFEST)]


def claim(out: Path, default: bool) -> dict[str, tuple[int, int]]:
    """Check that ``out`` may be written (refuse a non-empty folder without a manifest unless ``default``), create
    it, and return its listing before the report writes (for ``finish``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the report")
    if out.is_dir() and not default and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty and was not written by `normablate report` (no "
                          f"{MANIFEST}); choose a new or empty folder, so that none of its files is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    return _listing(out)


def finish(out: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """Record what this report wrote (new or changed files) in the manifest and delete the files the previous
    manifest listed that were not written again. Returns the names deleted."""
    previous = set(owned(out))
    now = _listing(out)
    written = sorted(n for n, st in now.items() if n != MANIFEST and before.get(n) != st)  # new or rewritten
    gone = sorted(previous - set(written))
    for name in gone:
        try:
            os.unlink(out / name)
        except FileNotFoundError:
            pass
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": written}, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return gone
