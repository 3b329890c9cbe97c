"""``MemoryWorkspaces``: session workspaces that exist only as names.

The real `~supervisor._workspace.WorkspaceManager` creates and removes
directories in worker threads. Under ``trio.testing.MockClock`` with autojump
a task waiting on a thread counts as blocked, so the clock jumps and timeouts
fire while a directory is being made: a simulation would stop being
deterministic. This twin makes no directory and starts no thread; it only
counts, so a simulation can also check that every workspace was released.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from .._worker._workspace import safe_name

__all__ = ["MemoryWorkspaces"]


@attrs.define(eq=False)
class MemoryWorkspaces:
    """Hands out unique workspace paths that are never created on disk.

    Pass it as ``Worker(config, workspaces=MemoryWorkspaces())``. Agents get a
    path that does not exist, so only in-process agents that do not touch
    their workspace belong with it.

    Attributes:
        root: the (non-existent) directory the paths are under.
        opened: workspaces handed out so far.
        closed: workspaces released so far.
    """

    root: Path = attrs.field(default=Path("/nonexistent/supervisor-sim"), converter=Path)
    opened: int = 0
    closed: int = 0

    @property
    def active(self) -> int:
        """Workspaces handed out and not yet released."""
        return self.opened - self.closed

    @asynccontextmanager
    async def open(self, session_id: str) -> AsyncIterator[Path]:
        """A fresh name for one session's workspace, counted as released on exit."""
        await trio.lowlevel.checkpoint()
        self.opened += 1
        try:
            yield self.root / f"{safe_name(session_id)}-{self.opened}"
        finally:
            self.closed += 1
