"""The shape of the engine: its modules import each other one way, and the runtime stands below the tasks.

Imports are read from the source (``ast``), function-local imports included, so a lazy import that only hides a
circle at import time still counts as an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "ctfm_engine"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the engine (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The engine modules that ``name`` imports anywhere in its source (``from pkg import module`` names the module,
    ``from module import name`` the module; the implicit import of a module's own packages is not an edge)."""

    def nearest_module(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(nearest_module(alias.name) for alias in node.names if alias.name.startswith("ctfm_engine"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "ctfm_engine" or source.startswith("ctfm_engine."):
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    found.add(submodule if submodule in modules else nearest_module(source))
    found.discard(None)
    found.discard(name)
    return {module for module in found if module is not None}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in on_stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def import_path(graph: dict[str, set[str]], start: str, prefix: str) -> list[str] | None:
    """A chain of imports from ``start`` to a module named ``prefix`` or below it, or None."""
    routes = {start: [start]}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for imported in sorted(graph.get(module, ())):
            if imported in routes:
                continue
            routes[imported] = routes[module] + [imported]
            if imported == prefix or imported.startswith(prefix + "."):
                return routes[imported]
            queue.append(imported)
    return None


def test_the_import_graph_sees_function_local_imports():
    graph = import_graph()
    assert "ctfm_engine.training.run_pretraining" in graph["ctfm_engine.training.runner"]  # imported inside a function
    assert "ctfm_engine.dicom.series" in graph["ctfm_engine.readers"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_engine():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or round a circle): " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_runtime_does_not_import_tasks():
    graph = import_graph()
    routes = [route for module in sorted(graph) if module.startswith("ctfm_engine.runtime")
              if (route := import_path(graph, module, "ctfm_engine.tasks")) is not None]
    assert not routes, "the runtime reaches the task layer: " + "; ".join(" -> ".join(route) for route in routes)
