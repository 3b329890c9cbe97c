"""The worker's machinery, for building a worker of your own or testing one part of it.

`supervisor.Worker` assembles these parts under one supervision tree, and most
applications need nothing here. They are public (documented, typed, kept
compatible within a minor version) for the few that do: a custom claim policy
around a `Poller`, a `LeaseKeeper` for work claimed some other way, a
`WedgeDetector` on another runtime's output. As with ``trio.lowlevel``, using
them means taking on the invariants the worker otherwise keeps for you.
"""

from __future__ import annotations

from ._base._lane import Offload as Offload, ThreadLane as ThreadLane
from ._worker._agent import AgentRunner as AgentRunner
from ._worker._delegations import (
    DelegationWatcher as DelegationWatcher,
    WatcherStats as WatcherStats,
)
from ._worker._lease import (
    KeeperOptions as KeeperOptions,
    Lease as Lease,
    LeaseKeeper as LeaseKeeper,
)
from ._worker._poller import (
    ClaimGate as ClaimGate,
    Poller as Poller,
    PollerStatistics as PollerStatistics,
    Slot as Slot,
)
from ._worker._presence import (
    Presence as Presence,
    PresenceStatistics as PresenceStatistics,
    RequestCounter as RequestCounter,
)
from ._worker._process import AgentResult as AgentResult, SessionOutput as SessionOutput
from ._worker._wedge import (
    BreakerStatistics as BreakerStatistics,
    WedgeBreaker as WedgeBreaker,
    WedgeDetector as WedgeDetector,
)
from ._worker._workspace import (
    WorkspaceManager as WorkspaceManager,
    WorkspaceStatistics as WorkspaceStatistics,
)

__all__ = [
    # Claiming: the poller hands each claimed item over with a session slot.
    "ClaimGate",
    "Poller",
    "PollerStatistics",
    "Slot",
    # Leases: one keeper heartbeats each claimed item and reports its outcome.
    "KeeperOptions",
    "Lease",
    "LeaseKeeper",
    # Presence: the worker's periodic report, and the request counts it carries.
    "Presence",
    "PresenceStatistics",
    "RequestCounter",
    # Wedges: a stuck agent runtime is detected from output, and claims pause.
    "BreakerStatistics",
    "WedgeBreaker",
    "WedgeDetector",
    # Sessions: the agent runner, its results, the workspaces and delegations.
    "AgentResult",
    "AgentRunner",
    "DelegationWatcher",
    "SessionOutput",
    "WatcherStats",
    "WorkspaceManager",
    "WorkspaceStatistics",
    # Blocking work off the event loop: the lane a worker runs its file calls in.
    "Offload",
    "ThreadLane",
]
