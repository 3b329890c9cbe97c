"""The control plane: protocol, models, embedded store, HTTP client and reference server."""

from ._embedded import (
    EmbeddedControlPlane as EmbeddedControlPlane,
    open_embedded_control_plane as open_embedded_control_plane,
)
from ._models import (
    NO_HEARTBEAT as NO_HEARTBEAT,
    Delegation as Delegation,
    DelegationStatus as DelegationStatus,
    HeartbeatResult as HeartbeatResult,
    Outcome as Outcome,
    OutcomeStatus as OutcomeStatus,
    PresenceReport as PresenceReport,
    SessionData as SessionData,
    SessionMessage as SessionMessage,
    WorkerRecord as WorkerRecord,
    WorkerStatus as WorkerStatus,
    WorkItem as WorkItem,
    WorkState as WorkState,
    WorkStats as WorkStats,
)
from ._protocol import ControlPlane as ControlPlane
from ._status import StatusPolicy as StatusPolicy
from ._store import LeasePolicy as LeasePolicy, SQLiteStore as SQLiteStore

__all__ = [
    "ControlPlane",
    "Delegation",
    "DelegationStatus",
    "EmbeddedControlPlane",
    "HeartbeatResult",
    "LeasePolicy",
    "NO_HEARTBEAT",
    "Outcome",
    "OutcomeStatus",
    "PresenceReport",
    "SQLiteStore",
    "SessionData",
    "SessionMessage",
    "StatusPolicy",
    "WorkItem",
    "WorkState",
    "WorkStats",
    "WorkerRecord",
    "WorkerStatus",
    "open_embedded_control_plane",
]
