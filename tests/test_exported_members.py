"""The public surface: ``__all__`` lists exactly what each public module exports.

Each public module's ``__all__`` is grouped (a comment line starts a group),
sorted within each group, and for the facade each group holds the names of one
layer. Names a module loads on first use count like the others: ``dir()`` shows
them and reading them imports them.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest

import supervisor
import supervisor.controlplane
import supervisor.lowlevel
import supervisor.testing

PUBLIC_MODULES = [supervisor, supervisor.lowlevel, supervisor.controlplane, supervisor.testing]

#: Libraries the tree never needs: importing ``supervisor`` must not load them.
HEAVY = ("hypercorn", "starlette", "prometheus_client", "rich", "httpx", "psycopg")


def _public(module: types.ModuleType) -> set[str]:
    """The package's own objects a module offers under a public name."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_")
        and getattr(getattr(module, name), "__module__", "").startswith("supervisor")
        and not isinstance(getattr(module, name), types.ModuleType)
    }


def _groups(module: types.ModuleType) -> list[list[str]]:
    """``__all__`` as written, split into its commented groups."""
    source = inspect.getsource(module)
    tree = ast.parse(source)
    node = next(
        n
        for n in tree.body
        if isinstance(n, ast.Assign | ast.AnnAssign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in _targets(n))
    )
    lines = source.splitlines()[node.lineno : node.end_lineno]
    groups: list[list[str]] = [[]]
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            if groups[-1]:
                groups.append([])
        elif text.startswith('"'):
            groups[-1].append(ast.literal_eval(text.rstrip(",")))
    return [g for g in groups if g]


def _targets(node: ast.Assign | ast.AnnAssign) -> list[ast.expr]:
    return list(node.targets) if isinstance(node, ast.Assign) else [node.target]


def _layer(value: object) -> str:
    module = str(getattr(value, "__module__", ""))
    return module.split(".")[1] if module.count(".") else module


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_name_in_all_is_importable(module: types.ModuleType) -> None:
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but missing"
    assert len(set(module.__all__)) == len(module.__all__), "a name is listed twice"


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_public_name_is_listed(module: types.ModuleType) -> None:
    assert _public(module) <= set(module.__all__)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_is_sorted_within_its_groups(module: types.ModuleType) -> None:
    groups = _groups(module)
    assert [name for group in groups for name in group] == module.__all__
    for group in groups:
        assert group == sorted(group), f"{module.__name__}: group {group[0]}... is not sorted"


def test_the_facade_groups_names_by_layer() -> None:
    groups = _groups(supervisor)
    layers = [{_layer(getattr(supervisor, name)) for name in group} for group in groups]
    assert all(len(layer) == 1 for layer in layers), layers
    assert [layer.pop() for layer in layers] == ["_base", "_tree", "_worker", "controlplane"]


def test_the_facade_is_the_day_to_day_surface() -> None:
    """The machinery and the HTTP-status errors live in their own modules, not here."""
    assert 40 <= len(supervisor.__all__) <= 50
    for name in ("Poller", "LeaseKeeper", "WorkspaceManager", "AgentRunner", "SessionOutput"):
        assert name not in supervisor.__all__
        assert name in supervisor.lowlevel.__all__
    for name in ("BadRequest", "Unauthorized", "NotFound", "Gone", "Conflict", "FencingConflict"):
        assert name not in supervisor.__all__
        assert name in supervisor.controlplane.__all__
    catch = ("ControlPlaneError", "TransientError", "FatalError", "ControlPlaneUnavailable")
    for name in catch:
        assert getattr(supervisor, name) is getattr(supervisor.controlplane, name)
    assert set(supervisor.__all__).isdisjoint(supervisor.lowlevel.__all__)


def test_a_missing_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="Poller"):
        supervisor.Poller  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        from supervisor import Poller  # type: ignore[attr-defined]  # noqa: F401


def _fresh_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
        timeout=60,
    )
    return done.stdout.strip()


def test_importing_the_package_loads_no_server_metrics_or_http_library() -> None:
    loaded = _fresh_python(
        "import supervisor, sys\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    assert loaded == "[]"


def test_the_worker_loads_on_first_use_without_the_http_libraries() -> None:
    loaded = _fresh_python(
        "import sys\n"
        "from supervisor import ThreadedWorker, Worker, open_worker\n"
        "assert Worker.__name__ == 'Worker' and callable(open_worker)\n"
        "assert ThreadedWorker.__module__ == 'supervisor._worker._threaded'\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    # The HTTP client loads when a worker opens a remote control plane, the
    # local API's server and the metrics registry when the API starts.
    assert loaded == "[]"


def test_a_worker_on_the_embedded_plane_without_its_api_loads_none_of_them(
    tmp_path: Path,
) -> None:
    """Serving a session end to end needs Trio, attrs and SQLite, nothing else heavy."""
    loaded = _fresh_python(
        "import sys, trio\n"
        "from supervisor import WorkerConfig, open_worker\n"
        "async def agent(ctx):\n"
        "    return 'done ' + ctx.prompt\n"
        "async def main():\n"
        f"    config = WorkerConfig(state_dir={str(tmp_path)!r}, api_enabled=False)\n"
        "    async with open_worker(config, agent=agent) as worker:\n"
        "        outcome = await worker.wait(await worker.submit('x'))\n"
        "    assert outcome.result == 'done x', outcome\n"
        "trio.run(main)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    assert loaded == "[]"


def test_dir_shows_the_names_loaded_on_first_use() -> None:
    listed = _fresh_python(
        "import supervisor\nprint(sorted(set(supervisor.__all__) - set(dir(supervisor))))"
    )
    assert listed == "[]"
