"""Shared test configuration.

``trio_mode`` (pyproject) makes every ``async def`` test a Trio test; use the
``autojump_clock`` fixture for anything timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

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
