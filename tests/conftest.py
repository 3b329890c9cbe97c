"""Shared test configuration, and the builders most test modules use.

``trio_mode`` (pyproject) makes every ``async def`` test a Trio test; use the
``autojump_clock`` fixture for anything timed.

Builders (fixtures): ``store`` (a SQLite store in ``store_path``), ``plane``
(the embedded control plane over it, on Trio's clock, so a ``MockClock`` moves
the store's time too) and ``config`` (makes a `WorkerConfig` for a test
worker). A module changes what they build by overriding ``store_options`` or
``config_defaults`` with a fixture of the same name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, settings

from supervisor import WorkerConfig
from supervisor.controlplane import EmbeddedControlPlane, SQLiteStore

# CI machines are small and noisy: no deadlines, and a fixed modest budget.
settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# A process that opens a workspace, reports it and waits to be killed: a worker
# that dies without running any cleanup.
_DOOMED = """
import sys, trio
from supervisor.lowlevel import WorkspaceManager

async def main():
    manager = WorkspaceManager(sys.argv[1], keep_workspaces=sys.argv[2] == "keep")
    async with manager.open("doomed") as path:
        (path / "work.txt").write_text("half done")
        print(path, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def _killed_worker_workspace(state_dir: Path, *, keep: bool = False) -> Path:
    """The workspace of a real process SIGKILLed while it was open."""
    with subprocess.Popen(
        [sys.executable, "-c", _DOOMED, str(state_dir), "keep" if keep else "clean"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    ) as proc:
        try:
            assert proc.stdout is not None
            path = Path(proc.stdout.readline().strip())
        finally:
            proc.kill()
    assert (path / "work.txt").read_text() == "half done"
    return path


@pytest.fixture
def killed_worker_workspace() -> Callable[..., Path]:
    """Make a workspace the way a worker killed mid-session leaves it (real SIGKILL)."""
    return _killed_worker_workspace


#: The Unix time the ``plane`` fixture's store sees at Trio time 0.
EPOCH = 1_700_000_000.0


@pytest.fixture
def store_options() -> dict[str, Any]:
    """`SQLiteStore` keywords for ``store`` (policies); a module overrides this to set them."""
    return {}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """The file of the ``store`` fixture (tests that reopen it, or look inside)."""
    return tmp_path / "controlplane.sqlite3"


@pytest.fixture
def store(store_path: Path, store_options: dict[str, Any]) -> Iterator[SQLiteStore]:
    """A SQLite store in a file of its own, closed after the test."""
    opened = SQLiteStore(store_path, **store_options)
    yield opened
    opened.close()


@pytest.fixture
async def plane(store: SQLiteStore) -> AsyncIterator[EmbeddedControlPlane]:
    """The embedded control plane over ``store``, its clock ``EPOCH`` + Trio time.

    Store calls run inline (in the Trio thread), so under ``MockClock`` no task
    waits on a thread while the clock jumps; with the real clock it behaves like
    any embedded plane.
    """
    cp = EmbeddedControlPlane(store, threaded=False, clock=lambda: EPOCH + trio.current_time())
    try:
        yield cp
    finally:
        await cp.aclose()


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    """What this module's test workers share; a module overrides this to change it."""
    return {}


@pytest.fixture
def config(tmp_path: Path, config_defaults: dict[str, Any]) -> Callable[..., WorkerConfig]:
    """Makes the settings of a test worker: ``config(max_concurrency=1, ...)``.

    Its state lives in ``tmp_path``; it serves no local API, polls briefly and
    drains within seconds, so a test never waits on production-sized timers.
    Keywords override ``config_defaults``, which override these.
    """

    def make(**overrides: Any) -> WorkerConfig:
        values: dict[str, Any] = {
            "state_dir": tmp_path / "state",
            "worker_id": "w1",
            "max_concurrency": 2,
            "poll_block_ms": 50,
            "api_enabled": False,
            "drain_timeout": 5.0,
        }
        return WorkerConfig(**{**values, **config_defaults, **overrides})

    return make
