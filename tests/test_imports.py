"""The package's import graph: no cycles (they hide which module owns a question), and the
request path imports only "downwards" (a backend never imports the gateway)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "comeapi"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    return _imports_in(path.read_text(encoding="utf-8"))


def _imports_in(source: str) -> set[str]:
    """Modules of comeapi that ``source`` imports anywhere, under TYPE_CHECKING too (a cycle
    of types is still two modules that each need the other), and through
    ``importlib.import_module("comeapi....")`` with the name written out."""
    tree = ast.parse(source)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comeapi"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("comeapi"))
        elif _is_import_module(node):
            assert isinstance(node, ast.Call)
            name = node.args[0] if node.args else None
            if isinstance(name, ast.Constant) and str(name.value).startswith("comeapi"):
                found.add(str(name.value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_import_module(node: ast.AST) -> bool:
    """``importlib.import_module(...)`` or ``import_module(...)``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # "from comeapi.x import y" may name a module y of package x: count the module.
        edges = set()
        for target in _imports(path):
            edges.add(target if target in modules else target.rsplit(".", 1)[0])
        graph[name] = {t for t in edges if t in modules and t != name}
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("comeapi.backend", "comeapi.gateway"),
        ("comeapi.backend", "comeapi.balancer"),
        ("comeapi.protocol", "comeapi.gateway"),
        ("comeapi.protocol", "comeapi.backend"),
        ("comeapi.cache", "comeapi.gateway"),
        ("comeapi.serverless", "comeapi.gateway"),
        ("comeapi.similar", "comeapi.gateway"),
        ("comeapi.similar", "comeapi.http"),
        ("comeapi.cache", "comeapi.similar"),
    ],
)
def test_nothing_imports_upwards(lower: str, upper: str) -> None:
    graph = _graph()
    wrong = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith(lower)
        for t in targets
        if t.startswith(upper)
    ]
    assert not wrong, wrong


def test_the_graph_sees_imports_through_importlib() -> None:
    """An import written as importlib.import_module("comeapi.x") is an edge like any other,
    so an upward one fails test_nothing_imports_upwards."""
    source = (
        "import importlib\n"
        "from importlib import import_module\n"
        "def late():\n"
        "    importlib.import_module('comeapi.gateway.app')\n"
        "    import_module('comeapi.balancer.pool')\n"
        "    importlib.import_module('json')\n"
    )
    assert _imports_in(source) == {"comeapi.gateway.app", "comeapi.balancer.pool"}


def test_only_the_cli_imports_modules_it_does_not_name() -> None:
    """``import_module(variable)`` is invisible to the graph: only the command line, which
    nothing imports and which imports its subcommands lazily by name, may do it."""
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        if _module(path).startswith("comeapi.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if _is_import_module(node):
                assert isinstance(node, ast.Call)
                if not (node.args and isinstance(node.args[0], ast.Constant)):
                    hidden.append(f"{_module(path)}:{node.lineno}")
    assert not hidden, hidden
