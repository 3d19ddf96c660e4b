"""normablate/sweep/ has no import cycle, lazy imports inside functions included (issue 27 step 5): the graph of
``normablate.sweep.*`` imports, read from the source with ``ast``, is acyclic; and every sweep module imports on its
own in a fresh interpreter. Imports under ``if TYPE_CHECKING:`` are type hints, never executed: not edges."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "normablate"
SWEEP = "normablate.sweep"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports anywhere (top level, functions, methods), as absolute dotted names; for
    ``from pkg import name`` also ``pkg.name`` (``name`` may be a submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:  # (the else branch does run)
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def sweep_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sorted((PACKAGE / "sweep").glob("*.py"))}
    return {m: {d for d in imports_of(p) if d in files and d != m and d != SWEEP} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first = last), or None. Depth-first search with three colours."""
    colour = {m: 0 for m in graph}  # 0 unvisited, 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if colour[d] == 1:
                return stack[stack.index(d):] + [d]
            if colour[d] == 0 and (c := dfs(d)):
                return c
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (c := dfs(m)):
            return c
    return None


def test_the_walker_sees_lazy_imports_and_finds_a_planted_cycle(tmp_path):
    src = tmp_path / "normablate" / "sweep"
    src.mkdir(parents=True)
    (src / "a.py").write_text("from .b import x\n")
    (src / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import y\n"
                              "def f():\n    from . import a\n")
    (src / "c.py").write_text("")
    b = imports_of(src / "b.py", tmp_path)
    assert "normablate.sweep.a" in b and "normablate.sweep.c" not in b  # lazy: an edge; TYPE_CHECKING: none
    assert "normablate.sweep.b" in imports_of(src / "a.py", tmp_path)
    graph = {"normablate.sweep.a": {"normablate.sweep.b"}, "normablate.sweep.b": {"normablate.sweep.a"},
             "normablate.sweep.c": set()}
    assert find_cycle(graph) == ["normablate.sweep.a", "normablate.sweep.b", "normablate.sweep.a"]
    assert find_cycle({**graph, "normablate.sweep.b": set()}) is None


def test_sweep_has_no_import_cycle():
    graph = sweep_graph()
    assert "normablate.sweep.runner" in graph and graph["normablate.sweep.runner"]  # the walk found the modules
    assert "normablate.sweep.supervise" in graph["normablate.sweep.runner"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in normablate/sweep: " + " -> ".join(cycle)


def test_signals_is_ground_floor():
    """``normablate.signals`` (the stop flag every layer uses) imports nothing of normablate."""
    assert not {m for m in imports_of(PACKAGE / "signals.py") if m.startswith("normablate")}


def test_every_sweep_module_imports_on_its_own():
    """Each ``normablate.sweep`` module imported first in a fresh interpreter state (every ``normablate`` module
    dropped from ``sys.modules`` before each; torch and the other libraries stay loaded, which keeps this fast)."""
    mods = sorted(module_name(p) for p in (PACKAGE / "sweep").glob("*.py") if p.stem != "__main__")
    probe = ("import importlib, json, sys\nfailed = {}\n"
             f"for m in {mods!r}:\n"
             "    for k in [k for k in sys.modules if k == 'normablate' or k.startswith('normablate.')]:\n"
             "        del sys.modules[k]\n"
             "    try:\n        importlib.import_module(m)\n"
             "    except Exception as e:\n        failed[m] = f'{type(e).__name__}: {e}'\n"
             "print('RESULT ' + json.dumps(failed))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert failed == {}
