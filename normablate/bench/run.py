"""``normablate bench``: run the chosen sections and write the report (``run_bench``, ``cmd_bench``)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import sections as registry
from .report import load_average, write
from .settings import Report, Settings


def run_bench(out: Path | str = "docs", quick: bool = False, tiny: bool = False, compile: bool = False,
              sections: list[str] | None = None, command: str | None = None,
              threads: int | None = None, norm_names: list[str] | None = None, sweep: bool = False,
              cifar10: str | None = None, keep: bool = True) -> tuple[Path, Path]:
    """Run the benchmark and write ``benchmarks.md`` / ``benchmarks.csv`` under ``out``; returns their paths.
    ``sections``: names of registered sections (``normablate.bench.sections.names()``; default: every section but
    the opt-in ones, such as ``sweep``, which takes minutes; ``sweep=True`` adds it), run in the report's order.
    ``cifar10``: the CIFAR-10 source of the data section (a local copy; default ``$NORMABLATE_BENCH_CIFAR10`` or
    the hub name). ``keep``: keep the sections of an earlier bench in ``out`` that this run does not measure."""
    s = Settings.make(quick=quick, tiny=tiny, compile=compile)
    if threads:
        torch.set_num_threads(threads)
    if norm_names:
        s.norms = tuple(norm_names)
    if cifar10:
        s.cifar10 = cifar10
    if sweep:
        s.sections = (*s.sections, "sweep")
    if sections:
        for name in sections:
            registry.get(name)  # an unknown name: ConfigError listing the sections, before anything runs
        s.sections = tuple(x for x in registry.names() if x in sections)
    report = Report(s, command or "normablate bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    provenance: dict[str, str] = {}
    runtimes: dict[str, str] = {}
    for name in s.sections:
        section = registry.get(name)
        t0 = time.perf_counter()
        load_before = load_average()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        report.rows += section.run(s)
        runtimes[name] = f"{time.perf_counter() - t0:.0f} s"
        provenance[name] = (f"Run: `{report.command}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load "
                            f"average (1, 5, 15 min) before {load_before}, after {load_average()}; torch threads "
                            f"{torch.get_num_threads()}; {section.sizes(s)}")
    return write(report, Path(out), provenance, runtimes, keep=keep)


def cmd_bench(args: argparse.Namespace) -> int:
    md, csv_path = run_bench(args.out, quick=args.quick, compile=args.compile, sections=args.only,
                             threads=args.threads, norm_names=getattr(args, "norms", None),
                             sweep=getattr(args, "sweep", False), cifar10=getattr(args, "cifar10", None))
    print(f"wrote {md} and {csv_path}")
    return 0
