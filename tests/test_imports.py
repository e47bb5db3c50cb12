"""The import graph keeps its rooms apart: evaluate and analysis never import each other (both use
shield_ds.plots / shield_ds.tables / shield_ds.data.records), and the CLI parser (shield_ds.cli) is imported by
the recipes only; the library declares its options in shield_ds.config, which never parses a command line.
And it has no loop: the graph of shield_ds/, recipes/ and benchmarks/, imports inside functions included, is
acyclic, so each floor imports only the floors below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED_DIRS = ("shield_ds", "benchmarks", "scripts")  # all code but recipes/ and tests/
APART = ("shield_ds.evaluate", "shield_ds.analysis")
CLI = "shield_ds.cli"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:` (imports for type checkers only: with
    postponed annotations they never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports_of(path: Path, module: str) -> set[str]:
    """Every module `path` imports anywhere in it (top level or inside functions), as dotted names;
    `from X import y` counts as both X and X.y (y may be a submodule), relative imports are resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path, dirs: tuple[str, ...] = CHECKED_DIRS) -> dict[str, set[str]]:
    """{module: modules it imports} for every .py file under root/<dir> for each dir."""
    graph = {}
    for directory in dirs:
        for path in sorted((root / directory).rglob("*.py")):
            name = _module_name(path, root)
            graph[name] = imports_of(path, name)
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _forbidden(module: str, target: str) -> bool:
    if _within(target, CLI):
        return not _within(module, CLI)
    return any(_within(module, a) and _within(target, b) for a, b in (APART, APART[::-1]))


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Each forbidden arrow as 'importer -> imported' (`from X import y` reported once, as X)."""
    bad = []
    for module, imported in sorted(graph.items()):
        reported: list[str] = []
        for target in sorted(imported):
            if _forbidden(module, target) and not any(_within(target, r) for r in reported):
                reported.append(target)
        bad += [f"{module} -> {target}" for target in reported]
    return bad


def test_evaluate_and_analysis_apart_and_cli_only_in_recipes():
    graph = import_graph(REPO)
    # the walk sees the real graph (a broken walk would pass vacuously)
    assert "shield_ds.engine" in graph["shield_ds.evaluate.evaluator"]
    assert "shield_ds.plots" in graph["shield_ds.analysis.report"]
    assert violations(graph) == []


def test_violations_are_found(tmp_path):
    files = {
        "shield_ds/__init__.py": "",
        "shield_ds/evaluate/__init__.py": "",
        "shield_ds/evaluate/asr.py": "def plot():\n    from shield_ds.analysis.plots import heatmap\n",
        "shield_ds/analysis/__init__.py": "",
        "shield_ds/analysis/report.py": "from ..evaluate import asr\n",
        "shield_ds/data/summary.py": "from shield_ds import cli\n",
        "shield_ds/cli.py": "import shield_ds.data\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(import_graph(tmp_path, ("shield_ds",)))
    assert found == ["shield_ds.analysis.report -> shield_ds.evaluate",
                     "shield_ds.data.summary -> shield_ds.cli",
                     "shield_ds.evaluate.asr -> shield_ds.analysis.plots"]


CYCLE_DIRS = ("shield_ds", "recipes", "benchmarks")


def internal_graph(root: Path, dirs: tuple[str, ...] = CYCLE_DIRS) -> dict[str, set[str]]:
    """`import_graph` restricted to the project's own modules: each imported name mapped to the module that
    defines it (`shield_ds.data.records.SafetyRecord` -> `shield_ds.data.records`); a benchmark's bare import
    of a file beside it (`import shield_bench`, on sys.path there) is that file."""
    graph = import_graph(root, dirs)
    known = set(graph)
    edges: dict[str, set[str]] = {}
    for module, imported in graph.items():
        targets = set()
        for name in imported:
            if module.startswith("benchmarks.") and f"benchmarks.{name}" in known:
                name = f"benchmarks.{name}"
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycle_anywhere():
    graph = internal_graph(REPO)
    assert "shield_ds.process_group" in graph["recipes.train"]  # the walk sees the real graph
    assert "benchmarks.shield_bench" in graph["benchmarks.worker"]
    assert cycles(graph) == []


def test_cycles_are_found(tmp_path):
    files = {"shield_ds/__init__.py": "", "shield_ds/a.py": "from shield_ds.b import x\n",
             "shield_ds/b.py": "def f():\n    from shield_ds import c\n", "shield_ds/c.py": "import shield_ds.a\n",
             "shield_ds/d.py": "from shield_ds.a import y\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cycles(internal_graph(tmp_path, ("shield_ds",))) == [["shield_ds.a", "shield_ds.b", "shield_ds.c"]]

