"""The modules of ``src/state`` import each other without circles.

Every import statement counts, including those inside functions (a lazy import hides a circle,
it does not remove it). Only edges between modules of the ``state`` package are followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Names a statement imports: ``import a.b`` -> a.b; ``from a import b`` -> a.b (a module) or a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(src: Path = SRC, package: str = "state") -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (a package name stands for its ``__init__``)."""
    files = {_module_name(p, src): p for p in (src / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for target in _imported(node, name, is_package):
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_state_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50 and "state.tx.infer.run" in graph  # the walk saw the package
    circles = find_circles(graph)
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_walk_finds_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg", "pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_circles(graph) == [["pkg.a", "pkg.b"]]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert find_circles(import_graph(tmp_path, "pkg")) == []


# The floors of docs/architecture.md: a module imports only from its own top-level part or lower floors.
FLOORS = {
    "utils": 0, "config_paths": 0,
    "io": 1,
    "training": 2,
    "tx": 3, "emb": 3,
    "datasets": 4, "heads": 4,
    "api": 5,
    "cli": 6,
    "__main__": 7,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        own = _part(module)
        for target in targets:
            other = _part(target)
            if not own or not other or other == own:
                continue  # the package root (version, lazy API re-exports) is not a floor
            if own in ("tx", "emb") and other in ("tx", "emb") or FLOORS[other] > FLOORS[own]:
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_imports_go_down_the_floors_and_tx_emb_stay_apart():
    graph = import_graph()
    assert set(map(_part, graph)) - {""} <= set(FLOORS), "a new top-level part needs a floor in FLOORS"
    assert upward_imports(graph) == []


def test_the_floor_rule_catches_an_upward_import():
    graph = {"state.utils.x": {"state.tx.y"}, "state.tx.y": {"state.emb.z"}, "state.cli.a": {"state.io.b"}}
    assert upward_imports(graph) == ["state.tx.y -> state.emb.z", "state.utils.x -> state.tx.y"]
