"""trainer/ has no import cycle, and trainer/config is a leaf.

The graph is read statically with `ast`: every `import` and `from ... import` anywhere in a module
counts, at the top, inside functions (a deferred import still closes a cycle, it only moves when
the cycle bites) and under `if TYPE_CHECKING:` (a type-only import is still a dependency of the
module's meaning, and a cycle through it is one refactor away from a runtime one).

An import names modules of trainer/ as Python would load them: `import trainer.x` and
`from trainer.x import name` mean trainer/x/__init__.py (or trainer/x.py); `from trainer.x import y`
where y is a submodule means trainer/x/y.py; relative imports are resolved against the importing
module's package. The parent packages Python also runs on the way (trainer/__init__.py for
trainer.x.y) are not counted as edges: a package's __init__ re-exporting its own submodules is
the ordinary package shape, and counting them would make every such package a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "trainer"


def module_files() -> dict[str, Path]:
    """Every module of trainer/ by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The trainer/ modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..y import z`
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete loop through a component, a -> b -> ... -> a, for the failure message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first from start, inside the component, until an edge returns to it
        node = frontier.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                frontier.append(target)
    return component


def test_the_graph_reads_every_kind_of_import() -> None:
    """The walker sees deferred, relative and from-package-import-submodule imports (so the cycle test can fail)."""
    graph = import_graph()
    assert "trainer.config.schema" in graph["trainer.config"]  # from trainer.config.schema import ...
    assert "trainer.parallel.dist" in graph["trainer.__main__"]  # from trainer.parallel.dist import ...
    assert "trainer.loop" in graph["trainer.__main__"]  # inside _run(): deferred
    assert len(graph) > 50


def test_trainer_has_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    lines = [f"{len(c)} modules: {' -> '.join(a_cycle(graph, c))}  (all: {', '.join(c)})" for c in found]
    assert not found, "import cycles in trainer/ (deferred imports included):\n" + "\n".join(lines)


def test_config_is_a_leaf() -> None:
    """trainer/config imports nothing of trainer/ outside itself: schema, loading and per-section checks."""
    graph = import_graph()
    outside = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name == "trainer.config" or name.startswith("trainer.config.")
        for target in targets
        if not (target == "trainer.config" or target.startswith("trainer.config."))
    }
    assert not outside, "trainer/config imports components:\n" + "\n".join(sorted(outside))
