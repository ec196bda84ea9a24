"""The module import graph: no cycle, and the Hydra app (moebench.train) imported only by the CLI.

Every import counts, function-level ones too (an import inside a function is a cycle that waits for
its first call). The CLI imports its subcommands by name (cli.COMMANDS), so those are its edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moebench
from moebench.cli import COMMANDS

PACKAGE = Path(moebench.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The moebench modules ``path`` imports (``from .moe import SoftMoE`` -> moebench.moe,
    ``from . import probe`` -> moebench.probe)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports_of(name, path, set(known)) for name, path in known.items()}
    edges["moebench.cli"] |= {f"moebench.{module}" for module, _ in COMMANDS.values()}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_checks():
    edges = graph()  # the parser finds relative, package and function-level imports
    assert "moebench.train" in edges["moebench.cli"]
    assert "moebench.moe" in edges["moebench.vit"]
    assert "moebench.moe.soft" in edges["moebench.inspection.routing"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_only_the_cli_imports_the_train_app():
    importers = sorted(name for name, targets in graph().items() if "moebench.train" in targets)
    assert importers == ["moebench.cli"]


def test_every_subpackage_ships_in_a_non_editable_install():
    """pyproject.toml lists the packages by hand: a new subpackage (e.g. moebench/pareto/) must be there."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(init) for init in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
