"""The import contract: the package's folders are its layers, and imports only point down.

    cli ──▶ worker ──▶ controlplane ──▶ base
                  └──▶ tree ─────────▶ base

``supervisor`` (the facade) and ``supervisor.lowlevel`` re-export from the layers;
``supervisor.testing`` may use anything. Nothing inside a layer imports upwards, the
facade or ``testing``. Every import counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "supervisor"

#: layer -> the layers it may import (itself always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "tree": frozenset({"base"}),
    "controlplane": frozenset({"base"}),
    "worker": frozenset({"tree", "controlplane", "base"}),
    "cli": frozenset({"worker", "tree", "controlplane", "base"}),
    "facade": frozenset({"worker", "tree", "controlplane", "base"}),
    "testing": frozenset({"cli", "worker", "tree", "controlplane", "base", "facade"}),
}


def layer_of(module: str) -> str:
    """The layer a dotted module name of the package belongs to."""
    parts = module.split(".")
    assert parts[0] == "supervisor", module
    if len(parts) == 1 or parts[1] in ("lowlevel",):
        return "facade"
    head = parts[1]
    return {
        "_base": "base",
        "_version": "base",
        "_tree": "tree",
        "controlplane": "controlplane",
        "_worker": "worker",
        "_cli": "cli",
        "__main__": "cli",
        "testing": "testing",
    }[head]


def module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every package module that ``source`` imports, with its line number."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from . import _x`` names a module, not an attribute.
            found += [
                (node.lineno, f"{target}.{a.name}") for a in node.names if a.name.startswith("_")
            ]
    return [(line, name) for line, name in found if name.split(".")[0] == "supervisor"]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The wrong-way imports in one module's source."""
    mine = layer_of(module)
    bad = []
    for line, target in imported_modules(source, module, is_package):
        try:
            theirs = layer_of(target)
        except KeyError:
            continue  # an attribute named like a private module, not a module
        if theirs != mine and theirs not in ALLOWED[mine]:
            bad.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    return bad


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    for path in all_modules():
        layer_of(module_name(path)[0])


def test_imports_point_down_the_layers() -> None:
    bad = []
    for path in all_modules():
        name, is_package = module_name(path)
        bad += violations(path.read_text(encoding="utf-8"), name, is_package)
    assert bad == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("supervisor._tree._supervisor", "from .._worker._lease import LeaseKeeper\n"),
        ("supervisor._base._lane", "def f():\n    from ..controlplane import _models\n"),
        ("supervisor.controlplane._store", "from supervisor._worker import _config\n"),
        ("supervisor._worker._poller", "from .._cli._main import main\n"),
        ("supervisor._worker._api", "from .. import __version__\n"),
        (
            "supervisor._tree._spec",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from ..controlplane._models import WorkItem\n",
        ),
        ("supervisor.controlplane._http", "import supervisor.testing\n"),
    ],
)
def test_a_planted_wrong_way_import_is_caught(module: str, source: str) -> None:
    assert violations(source, module) != []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("supervisor._worker._poller", "from ..controlplane._models import WorkItem\n"),
        ("supervisor._cli._main", "from .._worker._worker import Worker\n"),
        ("supervisor.testing._sim", "from .._worker._worker import Worker\n"),
        ("supervisor._tree._supervisor", "from .._base._groups import collapse_group\n"),
    ],
)
def test_a_downward_import_passes(module: str, source: str) -> None:
    assert violations(source, module) == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (every import, lazy ones included).

    ``from .x import name`` counts as an import of ``x`` (and of ``x.name`` when that
    is a module); a package's ``__init__`` counts as its own module.
    """
    names = {module_name(path)[0] for path in all_modules()}
    graph: dict[str, set[str]] = {}
    for path in all_modules():
        name, is_package = module_name(path)
        source = path.read_text(encoding="utf-8")
        targets = {target for _, target in imported_modules(source, name, is_package)}
        graph[name] = {t for t in targets if t in names and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted.

    A package importing its own submodules (``__init__`` re-exporting them) is not a
    cycle for this purpose: those edges are left out, since a submodule importing
    its package's ``__init__`` would be the real mistake, and it is kept.
    """
    edges = {
        module: {t for t in targets if not t.startswith(module + ".")}
        for module, targets in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_package_has_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_a_planted_cycle_is_found_including_a_lazy_import() -> None:
    graph = {
        "supervisor._worker._a": {"supervisor._worker._b"},
        "supervisor._worker._b": {"supervisor._worker._c"},
        "supervisor._worker._c": {"supervisor._worker._a"},
        "supervisor._worker._d": {"supervisor._worker._a"},
    }
    assert cycles(graph) == [
        ["supervisor._worker._a", "supervisor._worker._b", "supervisor._worker._c"]
    ]
    lazy = "def f():\n    from ._a import thing\n"
    assert "supervisor._worker._a" in {
        target for _, target in imported_modules(lazy, "supervisor._worker._b", False)
    }
