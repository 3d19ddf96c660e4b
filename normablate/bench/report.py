"""The bench's files: ``benchmarks.csv`` (one ``Row`` a line) and ``benchmarks.md`` (machine, goals, dead ends, and
per section its provenance line, its text and its table). A run of some sections keeps the others from the files
it finds (``previous``). The goals are data (``goals.py``); why one is not met, and the dead ends, are read from
docs/benchmark_notes.md (``notes``)."""
from __future__ import annotations

import csv
import functools
import io
import os
import platform
import re
import time
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from . import goals, sections
from .harness import repo_file
from .settings import Report, Settings
from .timing import FIELDS, Row

NOTES = ("docs", "benchmark_notes.md")  # in the source checkout


@functools.cache
def notes(path: Path | None = None) -> tuple[dict[str, str], tuple[str, ...]]:
    """The notes file's ``## why not: KEY`` paragraphs ({key: one line}) and its ``## dead ends`` list items; empty
    where the file is missing (an install without the docs: goal lines then carry no reason)."""
    path = path or repo_file(*NOTES)
    if not path.is_file():
        return {}, ()
    why: dict[str, str] = {}
    dead: list[str] = []
    heading, para = "", []

    def flush() -> None:
        if heading.startswith("why not: ") and para:
            why[heading.removeprefix("why not: ")] = " ".join(para)

    for line in path.read_text().splitlines():
        if line.startswith("## "):
            flush()
            heading, para = line[3:].strip(), []
        elif heading == "dead ends":
            if line.startswith("- "):
                dead.append(line[2:].strip())
            elif line.startswith("  ") and dead:
                dead[-1] += " " + line.strip()
        elif line.strip():
            para.append(line.strip())
    flush()
    return why, tuple(dead)


def why_not(key: str) -> str:
    return notes()[0].get(key, "")


def machine() -> dict[str, str]:
    import lightning
    import timm
    import torch

    from ..provenance import cpu_model

    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "timm": timm.__version__, "normablate": __version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else "no GPU"}


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def md_table(rows: list[Row]) -> str:
    head = "| name | layout | variant | ours | reference | ours | reference | ratio | note |\n|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        d = r.as_dict()
        unit = f" {r.unit}" if r.ours_value is not None else ""
        ref_unit = f" {r.unit}" if r.reference_value is not None else ""
        ratio = f"**{d['ratio']}×**" if d["ratio"] else ""
        lines.append(f"| {r.name} | {r.layout} | {r.variant} | {r.ours} | {r.reference} | {d['ours_value']}{unit} | "
                     f"{d['reference_value']}{ref_unit} | {ratio} | {r.note} |")
    return "\n".join(lines)


def _verdict(met: bool, why: str) -> str:
    return "met" if met else "NOT met" + (f" ({why})" if why else "")


def summary(rows: list[Row]) -> list[str]:
    """One line per goal found among ``rows``: the measured ratio and whether it is met."""
    lines, compiled = [], []
    for name, layout, ref, limit, goal in goals.COMPILED_GOALS:
        hit = [r for r in rows if r.section == "norms" and r.name == name and r.layout == layout
               and r.variant == "compiled" and r.reference == ref and r.ratio is not None]
        if hit:
            compiled.append(f"- {goal}: **{hit[0].ratio:.2f}×** — {'met' if hit[0].ratio <= limit else 'NOT met'}")
    for section, name, layout, ref, limit, goal in goals.GOALS:
        hit = [r for r in rows if r.section == section and r.name == name and r.layout == layout
               and r.variant == "eager" and r.ratio is not None and (not ref or r.reference == ref)
               and (ref or r.reference != "ln (ours)")]
        if hit:
            ratio = hit[0].ratio
            met = ratio <= limit
            lines.append(f"- {goal}: **{ratio:.2f}×** — " + _verdict(met, why_not(f"{name} {layout}".strip())))
    lines += compiled
    startup = {name: (limit, key) for name, limit, key in goals.STARTUP_GOALS}
    for r in rows:
        if r.section == "startup" and r.name in startup and r.ours_value:
            limit, key = startup[r.name]
            met = r.ours_value < limit
            label = f"`{r.name}`" if r.name.startswith("normablate") else r.name
            lines.append(f"- {label} under {limit:g} s: {r.ours_value:.2f} s — "
                         + _verdict(met, why_not(key) if key else ""))
    return lines + models_summary(rows)


def models_summary(rows: list[Row]) -> list[str]:
    """The model-level goals (issue 29, replacing the per-kernel masked_bn / noisy_bn goals of issue 11): every
    study variant's training step <= 1.10x its study's reference variant (LN; BN for santurkar_vgg) at the same
    settings, or the reason why not; and the share of the matmul peak each variant reaches."""
    eager = [r for r in rows if r.section == "models" and r.variant == "eager" and r.ratio is not None
             and r.ours != r.reference]
    if not eager:
        return []
    limit = goals.MODEL_STEP_LIMIT
    over = [r for r in eager if r.ratio > limit]
    lines = [f"- model level: every study variant's step <= {limit:.2f}x its study's reference variant "
             f"(first variant: LN, BN for santurkar_vgg): {len(eager) - len(over)} of {len(eager)} met"]
    model_notes = {k: v for k, v in notes()[0].items() if ": " in k}
    for r in over:
        why = next((v for start, v in model_notes.items() if r.name.startswith(start)), "")
        lines.append(f"  - {r.name}: **{r.ratio:.2f}×** — " + _verdict(False, why))
    share = [(r.name, 1 / r.ratio) for r in rows if r.section == "models" and r.variant == "GFLOP/s" and r.ratio]
    if share:
        lo, hi = min(share, key=lambda x: x[1]), max(share, key=lambda x: x[1])
        lines.append(f"- model steps reach {lo[1]:.0%} ({lo[0]}) to {hi[1]:.0%} ({hi[0]}) of the matmul peak "
                     f"measured in the same run")
        tf = [x for x in share if x[0].startswith(goals.TRANSFORMER_STUDIES)]
        gemm = [re.search(r"alone reaches (\d+%)", r.note) for r in rows if r.section == "models"
                and r.variant == "GFLOP/s" and "alone reaches" in r.note]
        if tf:
            target = goals.TRANSFORMER_PEAK_SHARE
            met = all(x[1] >= target for x in tf)
            bound = why_not("transformer peak").replace("{gemm}", " / ".join(g.group(1) for g in gemm if g))
            lines.append(f"- Transformers ({', '.join(goals.TRANSFORMER_STUDIES)}) >= {target:.0%} of the matmul "
                         f"peak: {min(x[1] for x in tf):.0%}-{max(x[1] for x in tf):.0%} — " + _verdict(met, bound))
    auto = [r for r in rows if r.section == "models" and r.variant == "auto vs eager" and r.ratio is not None]
    if auto:
        lines.append("- trainer.speed=auto vs eager (CNN study variants, channels-last): "
                     + ", ".join(f"{r.name.split(': ', 1)[1]} **{r.ratio:.2f}×**" for r in auto))
        first: dict[str, Row] = {}  # each study's first variant's auto step: the goal at the setting studies run
        for r in auto:
            first.setdefault(r.name.split(": ", 1)[0], r)
        lines.append("- at auto's setting (ratio of median auto steps, against the study's first variant): "
                     + ", ".join(f"{r.name.split(': ', 1)[1]} "
                                 f"**{r.ours_value / first[r.name.split(': ', 1)[0]].ours_value:.2f}×**"
                                 for r in auto if r is not first[r.name.split(": ", 1)[0]]))
    return lines


def previous(out: Path) -> tuple[list[Row], dict[str, str], dict[str, str]]:
    """What an earlier bench left in ``out``: its rows (CSV), each section's provenance line and run time (md).
    Files written before sections had their own provenance line give the header's command, date and load."""
    csv_path, md_path = out / "benchmarks.csv", out / "benchmarks.md"
    if not csv_path.is_file() or not md_path.is_file():
        return [], {}, {}
    try:
        rows = [Row.from_csv(d) for d in csv.DictReader(csv_path.open())]
    except (ValueError, TypeError, csv.Error):
        return [], {}, {}
    md = md_path.read_text().splitlines()
    header = {k: line.split(": ", 1)[1].strip() for line in md for k in ("Command", "Date", "Load average", "Sizes")
              if line.startswith(k) and ": " in line}
    fallback = ""
    if "Command" in header:
        fallback = (f"Run: {header['Command']}; {header.get('Date', '')}; load average (1, 5, 15 min) "
                    + header.get("Load average", "")
                    + (f"; {header['Sizes'].split('. Absolute')[0]}" if "Sizes" in header else ""))
    prov, runtimes, section = {}, {}, None
    for line in md:
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("Run: ") and section:  # rstrip: the markdown line break is written again below
            prov[section] = line.rstrip()
        elif line.startswith("Other norms' rows: ") and section in prov:
            prov[section] += "  \n" + line.rstrip()
        elif line.startswith("Section run times: "):
            for part in line.split(": ", 1)[1].split(", "):
                name, _, t = part.partition(": ")
                runtimes[name] = t
    for r in rows:
        prov.setdefault(r.section, fallback)
    return rows, prov, runtimes


def write(report: Report, out: Path, provenance: dict[str, str], runtimes: dict[str, str],
          keep: bool = True, header: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``benchmarks.csv`` and ``benchmarks.md`` under ``out``. With ``keep``, the sections of an earlier
    bench in ``out`` that this run did not measure are kept (rows, provenance line, run time). ``header``: the
    "Last command" and "Machine" lines to write (default: this run's command, now, and this machine)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "benchmarks.csv", out / "benchmarks.md"
    ran = set(report.settings.sections)
    old_rows, old_prov, old_times = previous(out) if keep else ([], {}, {})
    some = set(report.settings.norms or ())  # --norms: the other norms' rows of the norms section are kept too

    def measured(r: Row) -> bool:
        return r.section in ran and not (r.section == "norms" and some and r.name not in some)

    kept = [r for r in old_rows if not measured(r)]
    prov = {k: v for k, v in old_prov.items() if k not in ran}
    if some and "norms" in ran and any(r.section == "norms" for r in kept) and old_prov.get("norms"):
        tag = "Other norms' rows: "
        earlier = [x.removeprefix(tag) for x in old_prov["norms"].split("  \n")]
        provenance = {**provenance, "norms": "  \n".join([provenance.get("norms", ""),
                                                          *dict.fromkeys(tag + x for x in earlier)])}
    prov.update(provenance)
    times = {**{k: v for k, v in old_times.items() if k not in ran}, **runtimes}
    order = sections.order()
    rows = sorted([*kept, *report.rows], key=lambda r: order.get(r.section, len(order)))  # stable within a section
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.as_dict())
    csv_path.write_text(buf.getvalue())
    if header is None:
        header = [f"Last command: `{report.command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})  ",
                  "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items())]
    lines = ["# normablate benchmarks", "", *header, "",
             "Each section says the command that measured it, when, the load average before and after, and its "
             "sizes; a run of some sections (`--only`) keeps the others from the previous file. Absolute times on a "
             "shared, loaded machine are noisy; read the ratios (every comparison is interleaved).", ""]
    goal_lines = summary(rows)
    if goal_lines:
        lines += ["## Goals (issues 11 and 29), from the rows below", "", *goal_lines, ""]
    lines += ["## Measured and rejected (dead ends)", "", *[f"- {x}" for x in notes()[1]], ""]
    lines += ["Section run times: " + ", ".join(f"{k}: {times[k]}" for k in sorted(times, key=lambda k: order.get(k, 99)))]
    for section in sorted({r.section for r in rows}, key=lambda k: order.get(k, len(order))):
        srows = [r for r in rows if r.section == section]
        lines += ["", f"## {section}", ""]
        if prov.get(section):
            lines += [prov[section], ""]
        lines += [_text(section), "", md_table(srows)]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _text(section: str) -> str:
    """A section's paragraph; "" for a section no longer registered (its kept rows still print)."""
    try:
        return sections.get(section).text
    except ConfigError:
        return ""


def rerender(out: Path | str = "docs") -> Path:
    """Write ``out/benchmarks.md`` again from the rows and provenance lines in ``out`` (nothing measured; its
    "Last command" and "Machine" lines kept): after an edit of the goals (``goals.py``), of
    docs/benchmark_notes.md or of a section's text. ``python -m normablate.bench.report [OUT]``."""
    out = Path(out)
    md = (out / "benchmarks.md").read_text().splitlines()
    header = [line for line in md[:6] if line.startswith(("Last command: ", "Machine: "))]
    settings = Settings.make()
    settings.sections = ()
    return write(Report(settings, ""), out, {}, {}, header=header or None)[0]


if __name__ == "__main__":
    import sys

    print(f"wrote {rerender(*sys.argv[1:2])}")
