"""Imports flow one way: the app (``modulora``) -> the engine (``modulora_core``) <- plugins, with no cycle.

Every import of every module counts: at the top and inside functions, relative ones resolved, and
``importlib.import_module("name")`` with a constant name. Imports under ``if TYPE_CHECKING:`` never run,
so they cannot close a cycle; they still count for which package may import which.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP, CORE, PLUGIN = "modulora", "modulora_core", "modulora_plugin_"


@dataclass
class Graph:
    files: dict[str, Path] = field(default_factory=dict)  # module -> file
    # module -> {imported module (ours resolved to the longest known name; others as written): (line, runs)}
    edges: dict[str, dict[str, tuple[int, bool]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # imports of our own modules that do not exist


def top_packages(source_dir: Path) -> list[Path]:
    return sorted(p for p in source_dir.iterdir() if (p / "__init__.py").is_file()
                  and (p.name in (APP, CORE) or p.name.startswith(PLUGIN)))


def source_dirs(root: Path) -> list[Path]:
    """The repository root (``modulora``, ``modulora_core``, first-party plugins) and each ``plugins/*/``."""
    return [root, *sorted(p for p in (root / "plugins").glob("*") if p.is_dir())]


def _top(name: str) -> str:
    return name.split(".")[0]


def _where(graph: Graph, module: str, line: int) -> str:
    path = graph.files[module]
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def _resolve(graph: Graph, name: str) -> str:
    """``name`` cut to the longest prefix that is one of our modules; as written when none is."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in graph.files:
            return ".".join(parts[:i])
    return name


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, str | None, int, bool]] = []  # (module, name from it, line, runs)
        self.type_checking = False

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if not guarded:
            return self.generic_visit(node)
        self.type_checking, outer = True, self.type_checking
        for n in node.body:
            self.visit(n)
        self.type_checking = outer
        for n in node.orelse:
            self.visit(n)

    def _add(self, module: str, name: str | None, node: ast.AST) -> None:
        self.found.append((module, name, node.lineno, not self.type_checking))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._add(a.name, None, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        for a in node.names:
            self._add(module, None if a.name == "*" else a.name, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, None, node)
        self.generic_visit(node)


def build_graph(dirs: list[Path]) -> Graph:
    graph = Graph()
    packages: set[str] = set()
    for d in dirs:
        for top in top_packages(d):
            for path in sorted(top.rglob("*.py")):
                parts = list(path.relative_to(d).with_suffix("").parts)
                if path.name == "__init__.py":
                    parts.pop()
                    packages.add(".".join(parts))
                graph.files[".".join(parts)] = path
    ours = {_top(m) for m in graph.files}
    for module, path in graph.files.items():
        visitor = _Imports(module, module in packages)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges = graph.edges.setdefault(module, {})
        for imported, name, line, runs in visitor.found:
            gone = f"{module} imports {imported}, which does not exist, at {_where(graph, module, line)}"
            if _top(imported) in ours and imported not in graph.files and gone not in graph.missing:
                graph.missing.append(gone)
            sub = f"{imported}.{name}"  # `from pkg import sub` imports the submodule pkg.sub when there is one
            target = sub if sub in graph.files else _resolve(graph, imported)
            if target == module:
                continue
            old = edges.get(target)
            if old is None or (runs and not old[1]):  # keep the first import that runs
                edges[target] = (line, runs)
    return graph


def _successors(graph: Graph) -> dict[str, list[str]]:
    return {m: sorted(t for t, (_, runs) in graph.edges.get(m, {}).items() if runs and t in graph.files)
            for m in graph.files}


def import_loops(graph: Graph) -> list[list[str]]:
    """The strongly connected components of our modules (imports that run) with more than one member."""
    succ = _successors(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion depth stays low
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)
    return components


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """``[a, b, ..., a]``: the shortest way from the component's first module back to itself, inside it."""
    succ, members, start = _successors(graph), set(component), component[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while start not in prev:
        nxt = []
        for v in frontier:
            for w in succ[v]:
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    path = [start]
    while True:
        path.append(prev[path[-1]])
        if path[-1] == start:
            break
    return path[::-1]


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per loop of modules that import each other."""
    return [shortest_cycle(graph, comp) for comp in import_loops(graph)]


def describe(graph: Graph, cycle: list[str]) -> str:
    """``a -> b -> a`` and, per step, the line that imports."""
    steps = [f"{a} -> {b} at {_where(graph, a, graph.edges[a][b][0])}"
             for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join(cycle) + "".join(f"\n      {s}" for s in steps)


def layer_violations(graph: Graph) -> list[str]:
    """The core imports neither the app nor a plugin; a plugin imports, of ours, only the core and itself."""
    bad = []
    for module, edges in sorted(graph.edges.items()):
        src = _top(module)
        for target, (line, _) in sorted(edges.items()):
            dst = _top(target)
            if src == CORE and (dst == APP or dst.startswith(PLUGIN)):
                what = "the app" if dst == APP else "a plugin"
            elif src.startswith(PLUGIN) and (dst == APP or (dst.startswith(PLUGIN) and dst != src)):
                what = "the app" if dst == APP else "another plugin"
            else:
                continue
            bad.append(f"{module} imports {what}: {target} at {_where(graph, module, line)}")
    return bad


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(source_dirs(ROOT))


def test_the_graph_is_the_whole_project(graph: Graph) -> None:
    tops = {_top(m) for m in graph.files}
    assert {APP, CORE, "modulora_plugin_nf4", "modulora_plugin_optq", "modulora_plugin_quipsharp",
            "modulora_plugin_rtn"} <= tops
    assert len(graph.files) > 50
    # a function-level import and a relative one are edges
    assert "modulora_plugin_optq.gptq_format" in graph.edges["modulora_plugin_optq.quantizer"]
    assert "modulora.cli.plugins" in graph.edges["modulora.cli"]


def test_no_import_cycle(graph: Graph) -> None:
    loops = import_loops(graph)
    report = []
    for comp in loops:
        cycle = shortest_cycle(graph, comp)
        report.append(describe(graph, cycle) + (f"\n      (the loop holds {', '.join(comp)})"
                                                if len(comp) > len(cycle) - 1 else ""))
    assert not loops, "import cycles:\n  " + "\n  ".join(report)


def test_core_imports_neither_app_nor_plugins_and_plugins_only_the_core(graph: Graph) -> None:
    bad = layer_violations(graph)
    assert not bad, "imports against the layering app -> core <- plugins:\n  " + "\n  ".join(bad)


def test_every_import_of_our_modules_names_one_that_exists(graph: Graph) -> None:
    assert not graph.missing, "imports of modules that are not there (moved?):\n  " + "\n  ".join(graph.missing)


# The checks above must be able to fail: tiny packages with a planted fault, and one without.
# case: ({file: source}, cycles, layering violations, missing modules), the last two as message prefixes
PLANTED: dict[str, tuple[dict[str, str], list[list[str]], list[str], list[str]]] = {
    "clean": ({
        "modulora_core/__init__.py": "from .a import x\n",
        "modulora_core/a.py": "import json\nx = 1\n",
        "modulora/__init__.py": "from modulora_core import x\n",
        "modulora_plugin_demo/__init__.py": "from modulora_core.a import x\n",
    }, [], [], []),
    "cycle through a function-level import": ({
        "modulora_core/__init__.py": "",
        "modulora_core/a.py": "from . import b\n",
        "modulora_core/b.py": "def f():\n    from .c import y\n",
        "modulora_core/c.py": "from modulora_core.a import z\n",
    }, [["modulora_core.a", "modulora_core.b", "modulora_core.c", "modulora_core.a"]], [], []),
    "type-only back edge is no cycle": ({
        "modulora_core/__init__.py": "",
        "modulora_core/a.py": "from .b import y\n",
        "modulora_core/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",
    }, [], [], []),
    "core imports the app and a plugin": ({
        "modulora_core/__init__.py": "",
        "modulora_core/a.py": "def f():\n    import modulora.cli\n    importlib.import_module('modulora_plugin_x')\n",
        "modulora/__init__.py": "",
        "modulora/cli.py": "",
    }, [], ["modulora_core.a imports the app", "modulora_core.a imports a plugin"], []),
    "plugin imports the app and another plugin": ({
        "modulora_core/__init__.py": "",
        "modulora/__init__.py": "",
        "modulora/cli.py": "",
        "modulora_plugin_x/__init__.py": "from modulora.cli import main\nfrom modulora_plugin_y import q\n",
        "modulora_plugin_y/__init__.py": "from modulora_core import hookimpl\n",
    }, [], ["modulora_plugin_x imports the app", "modulora_plugin_x imports another plugin"], []),
    "an import of a module that moved": ({
        "modulora_core/__init__.py": "",
        "modulora/__init__.py": "from modulora_core.plan import plan\n",
        "modulora/plan.py": "def plan():\n    pass\n",
    }, [], [], ["modulora imports modulora_core.plan, which does not exist"]),
}


def _starts(got: list[str], want: list[str]) -> bool:
    return len(got) == len(want) and all(g.startswith(w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("case", list(PLANTED))
def test_the_checks_catch_planted_faults(tmp_path: Path, case: str) -> None:
    files, cycles, bad, missing = PLANTED[case]
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    g = build_graph([tmp_path])
    assert set(g.files) == {rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for rel in files}
    assert find_cycles(g) == cycles
    for cycle in cycles:
        assert describe(g, cycle).startswith(" -> ".join(cycle))
    assert _starts(layer_violations(g), bad), layer_violations(g)
    assert _starts(g.missing, missing), g.missing
