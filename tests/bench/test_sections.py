"""The bench's section registry (normablate/bench/sections/): a section is one file. A module dropped into the
package is found without being imported (the CLI's ``--only`` offers it), runs through ``normablate bench --only``
and lands in benchmarks.md/.csv with its text and sizes; a section registered from elsewhere runs through
``run_bench``; names are checked before anything runs."""
from __future__ import annotations

import csv
import sys
import textwrap

import pytest

from normablate import bench
from normablate.bench import sections
from normablate.cli import main
from normablate.errors import ConfigError

TOY_MODULE = '''
"""A toy bench section: one file, nothing else edited."""
from normablate.bench.sections import register
from normablate.bench.timing import Row

TEXT = "Toy rows: a constant, to prove that a section is one file."


def sizes(s):
    return f"{s.repeats} toy repeats"


@register("toy_file", text=TEXT, sizes=sizes)
def run(s):
    return [Row("toy_file", "constant", "", "eager", "two", "one", 2.0, 1.0, "ms", 2.0, note="toy")]
'''


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A private copy of the registry, and a folder on the sections package's path for toy modules."""
    sections.defaults()  # every built-in section module imported (registered) before the copy
    monkeypatch.setattr(sections, "_REGISTRY", dict(sections._REGISTRY))
    pkg_dir = tmp_path / "pkg"
    pkg_dir.mkdir()
    monkeypatch.setattr(sections, "__path__", [*sections.__path__, str(pkg_dir)])
    yield pkg_dir
    sys.modules.pop("normablate.bench.sections.toy_file", None)


def _rows(csv_path):
    return list(csv.DictReader(csv_path.open()))


def test_a_section_module_is_one_file_run_by_bench_only(registry, tmp_path):
    (registry / "toy_file.py").write_text(textwrap.dedent(TOY_MODULE))
    assert "normablate.bench.sections.toy_file" not in sys.modules
    assert sections.names()[-1] == "toy_file"  # after the built-in sections, found without importing it
    assert "normablate.bench.sections.toy_file" not in sys.modules
    out = tmp_path / "out"
    assert main(["bench", "--only", "toy_file", "--out", str(out)]) == 0
    rows = _rows(out / "benchmarks.csv")
    assert [(r["section"], r["name"], r["ours_value"], r["ratio"]) for r in rows] == [("toy_file", "constant", "2",
                                                                                       "2")]
    text = (out / "benchmarks.md").read_text()
    assert "## toy_file" in text and "Toy rows: a constant, to prove that a section is one file." in text
    assert "25 toy repeats" in text  # its sizes, in its provenance line (full settings: 25 repeats)
    assert "| constant |  | eager | two | one | 2 ms | 1 ms | **2×** | toy |" in text
    assert "toy_file" in sections.defaults()  # registered with default=True: a plain bench runs it too


def test_a_section_registered_elsewhere_runs_through_run_bench(registry, tmp_path):
    calls = []

    @sections.register("toy_plugin", text="Plug-in toy.", sizes=lambda s: f"image {s.image}", default=False)
    def toy(s):
        calls.append(s.tiny)
        return [bench.Row("toy_plugin", "x", ours_value=1.0, unit="s")]

    assert "toy_plugin" in sections.names() and "toy_plugin" not in sections.defaults()
    _, csv_path = bench.run_bench(tmp_path, tiny=True, sections=["toy_plugin"], command="pytest toy")
    assert calls == [True]
    assert [(r["section"], r["name"], r["ours_value"]) for r in _rows(csv_path)] == [("toy_plugin", "x", "1")]
    text = (tmp_path / "benchmarks.md").read_text()
    assert "Run: `pytest toy`" in text and "image (4, 8, 4, 4)" in text and "Plug-in toy." in text


def test_section_names_are_checked_before_anything_runs(registry, tmp_path):
    ran = []
    sections.register("toy_a", text="", sizes=None)(lambda s: ran.append(1) or [])
    with pytest.raises(ConfigError, match="unknown bench section 'toy_b'.*toy_a"):
        bench.run_bench(tmp_path, tiny=True, sections=["toy_a", "toy_b"])
    assert ran == [] and not (tmp_path / "benchmarks.csv").exists()


def test_a_section_name_is_registered_once(registry):
    sections.register("toy_dup", text="")(lambda s: [])
    with pytest.raises(ValueError, match="already registered"):
        sections.register("toy_dup", text="")(lambda s: [1])
