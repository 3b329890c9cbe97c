"""The control plane: protocol, models, embedded store, HTTP client and reference server."""

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

__all__ = [
    "ControlPlane",
    "Delegation",
    "DelegationStatus",
    "HeartbeatResult",
    "NO_HEARTBEAT",
    "Outcome",
    "OutcomeStatus",
    "PresenceReport",
    "SessionData",
    "SessionMessage",
    "WorkItem",
    "WorkState",
    "WorkStats",
    "WorkerRecord",
    "WorkerStatus",
]
