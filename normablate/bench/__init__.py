"""``normablate bench``: how fast each norm, the framework and the tool itself are, on this machine.

Writes ``<out>/benchmarks.md`` and ``<out>/benchmarks.csv`` with the machine, library versions, the exact
command and the load average, and one part per section. The package::

    sections/      one module per section (norms, allocator, inference, vit_inference, framework, models, startup,
                   data, sweep), each registering ``run(settings) -> list[Row]`` with its text and sizes;
                   ``sections/__init__.py`` is the torch-free registry the CLI reads for ``--only``
    timing.py      interleaved timing, paired ratios and their CI, ``Row``
    settings.py    ``Settings`` (sizes and repeats: full, ``quick``, ``tiny``) and ``Report``
    harness.py     what several sections share: run configs, a hand-written training step, a study's variants
    goals.py       the goals, as data; why one is not met: docs/benchmark_notes.md
    report.py      the markdown/CSV writer (keeps the sections a run did not measure)
    run.py         ``run_bench`` and the CLI's ``cmd_bench``

Timing: every comparison is interleaved (A, B, A, B, ...) and reported as medians and as the median of the
per-repeat ratios, so a loaded machine slows both sides alike; absolute times on a shared machine are noisy,
ratios much less. Nothing here is asserted by the tests: they only check that a tiny bench runs and writes
well-formed results.

Importing this package imports nothing heavy; the names below are loaded on first use (PEP 562).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {  # name -> module of this package
    "Row": "timing", "FIELDS": "timing", "interleaved": "timing", "paired_ratio": "timing", "ratio_ci": "timing",
    "Settings": "settings", "Report": "settings",
    "run_bench": "run", "cmd_bench": "run",
    "write": "report", "previous": "report", "summary": "report",
}


def __getattr__(name: str) -> Any:
    if name == "SECTIONS":
        from .sections import names

        return names()
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FIELDS", "SECTIONS", "Report", "Row", "Settings", "cmd_bench", "interleaved", "paired_ratio",
           "ratio_ci", "run_bench", "write"]
