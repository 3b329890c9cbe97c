"""Records a supervisor produces: exits, lifecycle events, snapshots.

All frozen and cheap to build; snapshots convert to plain JSON data with
``as_dict()``.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .._base._describe import describe_exception

__all__ = [
    "ChildCounts",
    "ChildExit",
    "ChildInfo",
    "ChildSnapshot",
    "ChildState",
    "EventKind",
    "ExitKind",
    "SupervisorEvent",
    "SupervisorSnapshot",
]


class ExitKind(enum.Enum):
    """How a child ended (OTP exit reasons).

    ``NORMAL``: it returned. ``SHUTDOWN``: it raised ``Shutdown``, or this
    supervisor stopped it on purpose. ``ABNORMAL``: it raised an ``Exception``.
    """

    NORMAL = "normal"
    SHUTDOWN = "shutdown"
    ABNORMAL = "abnormal"


class ChildState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class EventKind(enum.Enum):
    CHILD_STARTED = "child_started"
    CHILD_EXITED = "child_exited"
    CHILD_RESTARTING = "child_restarting"
    CHILD_UNRESPONSIVE = "child_unresponsive"
    SUPERVISOR_ESCALATED = "supervisor_escalated"
    SUPERVISOR_AUTO_SHUTDOWN = "supervisor_auto_shutdown"


@attrs.frozen
class ChildExit:
    """One exit of one child.

    Attributes:
        child_id: which child.
        kind: how it ended.
        time: ``trio.current_time()`` when it ended.
        exception: what it raised, if anything (not part of equality).
        requested: ``True`` when this supervisor stopped it on purpose.
    """

    child_id: str
    kind: ExitKind
    time: float
    exception: BaseException | None = attrs.field(default=None, eq=False, repr=False)
    requested: bool = False

    @property
    def reason(self) -> str:
        """A one-line description: ``normal``, ``shutdown`` or ``ErrorType: message``."""
        if self.kind is ExitKind.ABNORMAL:
            return describe_exception(self.exception)
        return str(self.kind.value)


@attrs.frozen
class SupervisorEvent:
    """A lifecycle event (also logged under the ``supervisor`` logger).

    Attributes:
        kind: what happened.
        supervisor: the name of the supervisor it happened in.
        child_id: the child concerned, if any.
        time: ``trio.current_time()``.
        exit: the exit concerned (for ``child_exited``, escalation, auto-shutdown).
        delay: for ``child_restarting``, seconds until the restart.
    """

    kind: EventKind
    supervisor: str
    child_id: str | None
    time: float
    exit: ChildExit | None = None
    delay: float | None = None


@attrs.frozen
class ChildInfo:
    """A line of ``Supervisor.which_children()``."""

    id: str
    state: ChildState
    restart: str
    is_supervisor: bool


@attrs.frozen
class ChildCounts:
    """``Supervisor.count_children()``, as OTP counts them."""

    specs: int
    active: int
    supervisors: int
    workers: int


@attrs.frozen
class ChildSnapshot:
    """One child in a ``SupervisorSnapshot``."""

    id: str
    state: ChildState
    restart: str
    significant: bool
    restart_count: int
    last_exit_kind: ExitKind | None
    last_exit_reason: str | None
    started_at: float | None
    uptime: float | None
    supervisor: SupervisorSnapshot | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "restart": self.restart,
            "significant": self.significant,
            "restart_count": self.restart_count,
            "last_exit_kind": self.last_exit_kind.value if self.last_exit_kind else None,
            "last_exit_reason": self.last_exit_reason,
            "started_at": self.started_at,
            "uptime": self.uptime,
            "supervisor": self.supervisor.as_dict() if self.supervisor else None,
        }


@attrs.frozen
class SupervisorSnapshot:
    """A frozen picture of a supervisor and its children, nested supervisors inline.

    ``started_at`` is wall-clock POSIX time; ``uptime`` is measured on the Trio clock.
    """

    name: str
    strategy: str
    running: bool
    restarts_in_window: int
    intensity: int
    period: float
    children: tuple[ChildSnapshot, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (``json.dumps`` accepts it as is)."""
        return {
            "name": self.name,
            "strategy": self.strategy,
            "running": self.running,
            "restarts_in_window": self.restarts_in_window,
            "intensity": self.intensity,
            "period": self.period,
            "children": [c.as_dict() for c in self.children],
        }

    def find(self, *path: str) -> ChildSnapshot | None:
        """The child at ``path`` (ids through nested supervisors), or ``None``."""
        node: SupervisorSnapshot | None = self
        found: ChildSnapshot | None = None
        for part in path:
            if node is None:
                return None
            found = next((c for c in node.children if c.id == part), None)
            if found is None:
                return None
            node = found.supervisor
        return found
